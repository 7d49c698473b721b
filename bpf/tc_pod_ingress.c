/* tc ingress on an enrolled pod's host-side veth (traffic leaving the pod).
 *
 * - TCP from the pod to anything but the node itself -> the agent's :15001.
 * - TCP into the pod that tc_pod_egress turned back (a same-node client) ->
 *   :15008 / :15006, like inbound traffic from the underlay.
 * - Packets of flows the agent owns go to the agent's socket.
 */
#include "steer.h"

int zt_pod_ingress(struct __sk_buff *skb)
{
	struct zt_tcp4 p = {};
	if (parse_tcp4(skb, &p) < 0)
		return TC_ACT_OK;
	struct zt_config *cfg = cfg_ready();
	if (!cfg)
		return TC_ACT_SHOT;
	if (cfg->agent_mark && skb->mark == cfg->agent_mark) {
		reason_inc(ZT_R_PASS_MARK);
		return TC_ACT_OK;
	}
	__u32 saddr = p.tuple.ipv4.saddr;
	__u32 daddr = p.tuple.ipv4.daddr;
	struct zt_pod *src = pod_get(saddr);
	if (src) {
		if (is_node_ip(daddr)) {
			reason_inc(ZT_R_PASS_NODE);
			return TC_ACT_OK;
		}
		return steer_to(skb, cfg, &p, cfg->port_out, saddr, ZT_R_OUT_CAPTURED, ZT_PC_OUT);
	}
	struct zt_pod *dst = pod_get(daddr);
	if (dst && dst->ifindex == skb->ifindex)
		return steer_inbound(skb, cfg, &p);
	reason_inc(ZT_R_PASS_NOT_ENROLLED);
	return TC_ACT_OK;
}
