/* tc egress on an enrolled pod's host-side veth (traffic entering the pod).
 *
 * Packets the node forwards from another local pod (no local socket: skb->sk
 * is NULL) are turned back into this veth's ingress, where tc_pod_ingress
 * steers them to the agent's inbound listeners: a same-node client, enrolled
 * or not, meets the destination's policy. Packets the node itself sends (the
 * agent's upstream sockets, kubelet-style health checks) carry a socket and
 * reach the pod directly.
 */
#include "steer.h"

int zt_pod_egress(struct __sk_buff *skb)
{
	struct zt_tcp4 p = {};
	if (parse_tcp4(skb, &p) < 0)
		return TC_ACT_OK;
	struct bpf_sock *local = skb->sk;
	if (local) {
		reason_inc(ZT_R_PASS_LOCAL);
		return TC_ACT_OK;
	}
	__u32 daddr = p.tuple.ipv4.daddr;
	struct zt_pod *dst = pod_get(daddr);
	if (!dst || dst->ifindex != skb->ifindex) {
		reason_inc(ZT_R_PASS_NOT_ENROLLED);
		return TC_ACT_OK;
	}
	/* Our own MAC becomes the destination so the turned-back frame is for us. */
	__u8 mac[ETH_ALEN];
	if (bpf_skb_load_bytes(skb, ETH_ALEN, mac, ETH_ALEN) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, 0, mac, ETH_ALEN, 0) < 0)
		return TC_ACT_SHOT;
	reason_inc(ZT_R_SAME_NODE);
	return bpf_redirect(skb->ifindex, BPF_F_INGRESS);
}
