/* tc egress on an enrolled pod's host-side veth (traffic entering the pod).
 *
 * Two kinds of packet are turned back into this veth's ingress, where
 * tc_pod_ingress steers them to the agent's inbound listeners:
 * - packets the node forwards from another local pod (no local socket:
 *   skb->sk is NULL): a same-node client, enrolled or not, meets the
 *   destination's policy;
 * - the agent's own HBONE connections to this pod's :15008 (marked socket):
 *   same-node mesh traffic reaches the agent's :15008 like traffic from
 *   another node does.
 * Everything else the node itself sends (the agent's connections to the
 * application port, kubelet-style health checks) reaches the pod directly.
 */
#include "steer.h"

static __always_inline int turn_back(struct __sk_buff *skb)
{
	/* Our own MAC becomes the destination so the turned-back frame is for us. */
	__u8 mac[ETH_ALEN];
	if (bpf_skb_load_bytes(skb, ETH_ALEN, mac, ETH_ALEN) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, 0, mac, ETH_ALEN, 0) < 0)
		return TC_ACT_SHOT;
	reason_inc(ZT_R_SAME_NODE);
	return bpf_redirect(skb->ifindex, BPF_F_INGRESS);
}

int zt_pod_egress(struct __sk_buff *skb)
{
	struct zt_tcp4 p = {};
	if (parse_tcp4(skb, &p) < 0)
		return TC_ACT_OK;
	__u32 daddr = p.tuple.ipv4.daddr;
	struct zt_pod *dst = pod_get(daddr);
	if (!dst || dst->ifindex != skb->ifindex) {
		reason_inc(ZT_R_PASS_NOT_ENROLLED);
		return TC_ACT_OK;
	}
	struct bpf_sock *local = skb->sk;
	if (!local)
		return turn_back(skb);
	struct zt_config *cfg = cfg_get();
	if (cfg && cfg->ready && cfg->agent_mark && skb->mark == cfg->agent_mark &&
	    p.tuple.ipv4.dport == cfg->port_hbone)
		return turn_back(skb);
	reason_inc(ZT_R_PASS_LOCAL);
	return TC_ACT_OK;
}
