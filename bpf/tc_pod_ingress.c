/* tc ingress on an enrolled pod's host-side veth (traffic leaving the pod).
 *
 * - TCP from the pod to anything but the node itself -> the agent's :15001.
 * - TCP into the pod that tc_pod_egress turned back (a same-node client, or
 *   the agent's own marked HBONE connection) -> :15008 / :15006, like inbound
 *   traffic from the underlay.
 * - Packets of flows the agent owns go to the agent's socket.
 * - A pod claiming the node's address (without the agent's mark, which only
 *   turned-back packets carry) is dropped: the veth accepts local sources.
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
	__u32 saddr = p.tuple.ipv4.saddr;
	__u32 daddr = p.tuple.ipv4.daddr;
	int marked = cfg->agent_mark && skb->mark == cfg->agent_mark;
	struct zt_pod *src = marked ? 0 : pod_get(saddr);
	if (src) {
		if (is_node_ip(daddr)) {
			reason_inc(ZT_R_PASS_NODE);
			return TC_ACT_OK;
		}
		return steer_to(skb, cfg, &p, cfg->port_out, saddr, ZT_R_OUT_CAPTURED, ZT_PC_OUT);
	}
	if (!marked && is_node_ip(saddr)) {
		reason_inc(ZT_R_DROP_SPOOFED);
		return TC_ACT_SHOT;
	}
	struct zt_pod *dst = pod_get(daddr);
	if (dst && dst->ifindex == skb->ifindex)
		return steer_inbound(skb, cfg, &p);
	reason_inc(marked ? ZT_R_PASS_MARK : ZT_R_PASS_NOT_ENROLLED);
	return TC_ACT_OK;
}
