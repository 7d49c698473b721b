/* tc ingress on the node's underlay-facing interface (traffic from other nodes).
 *
 * TCP to an enrolled pod of this node: :15008 -> the agent's HBONE listener,
 * any other port -> the agent's :15006 (plaintext from outside the mesh, which
 * the destination's policy then judges). Nothing else is touched.
 */
#include "steer.h"

int zt_underlay_in(struct __sk_buff *skb)
{
	struct zt_tcp4 p = {};
	if (parse_tcp4(skb, &p) < 0)
		return TC_ACT_OK;
	__u32 daddr = p.tuple.ipv4.daddr;
	struct zt_pod *dst = pod_get(daddr);
	if (!dst)
		return TC_ACT_OK;
	struct zt_config *cfg = cfg_ready();
	if (!cfg)
		return TC_ACT_SHOT;
	if (cfg->agent_mark && skb->mark == cfg->agent_mark) {
		reason_inc(ZT_R_PASS_MARK);
		return TC_ACT_OK;
	}
	return steer_inbound(skb, cfg, &p);
}
