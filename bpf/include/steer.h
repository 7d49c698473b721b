/* Steering a packet to a socket of the agent: the shared core of the hooks.
 *
 * A packet of a flow the agent already owns goes to that socket; any other
 * packet goes to the agent's IP_TRANSPARENT listener on the given port, so the
 * original destination survives as the accepted socket's local address. When
 * the listener is gone (agent down) the packet is dropped and counted: captured
 * traffic never continues in plaintext. Steered packets carry route_mark, which
 * the node's policy route (`fwmark -> local default dev lo`) delivers locally.
 */
#ifndef ZT_STEER_H
#define ZT_STEER_H

#include <uapi/linux/pkt_cls.h>
#include "maps.h"
#include "parse.h"

static __always_inline int steer_drop(__u32 pod_ip, int reason)
{
	reason_inc(reason);
	podstat_inc(pod_ip, ZT_PC_DROP);
	return TC_ACT_SHOT;
}

/* Assign to the flow's own socket if the agent has one (not a listener). */
static __always_inline int steer_established(struct __sk_buff *skb, struct zt_config *cfg,
				    struct zt_tcp4 *p, __u32 pod_ip)
{
	struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &p->tuple, sizeof(p->tuple.ipv4),
						 BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return -1;
	if (sk->state == BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		return -1;
	}
	long err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err)
		return steer_drop(pod_ip, ZT_R_DROP_ASSIGN);
	skb->mark = cfg->route_mark;
	reason_inc(ZT_R_ESTABLISHED);
	podstat_inc(pod_ip, ZT_PC_EST);
	return TC_ACT_OK;
}

/* Steer to the listener on `port` (network order); fail closed. */
static __always_inline int steer_to(struct __sk_buff *skb, struct zt_config *cfg, struct zt_tcp4 *p,
			   __u16 port, __u32 pod_ip, int reason, enum zt_pod_counter counter)
{
	int verdict = steer_established(skb, cfg, p, pod_ip);
	if (verdict >= 0)
		return verdict;

	struct bpf_sock_tuple ln = {};
	ln.ipv4.saddr = p->tuple.ipv4.saddr;
	ln.ipv4.sport = p->tuple.ipv4.sport;
	ln.ipv4.daddr = cfg->listen_ip ? cfg->listen_ip : p->tuple.ipv4.daddr;
	ln.ipv4.dport = port;
	struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &ln, sizeof(ln.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return steer_drop(pod_ip, ZT_R_DROP_NO_LISTENER);
	if (sk->state != BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		return steer_drop(pod_ip, ZT_R_DROP_NO_LISTENER);
	}
	long err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err)
		return steer_drop(pod_ip, ZT_R_DROP_ASSIGN);
	skb->mark = cfg->route_mark;
	if (p->syn && !p->ack) {
		/* count connections, not packets */
		reason_inc(reason);
		podstat_inc(pod_ip, counter);
	}
	return TC_ACT_OK;
}

/* Inbound: :15008 stays HBONE, every other port is plaintext for :15006. */
static __always_inline int steer_inbound(struct __sk_buff *skb, struct zt_config *cfg, struct zt_tcp4 *p)
{
	__u32 pod_ip = p->tuple.ipv4.daddr;
	if (p->tuple.ipv4.dport == cfg->port_hbone)
		return steer_to(skb, cfg, p, cfg->port_hbone, pod_ip, ZT_R_IN_HBONE, ZT_PC_IN);
	return steer_to(skb, cfg, p, cfg->port_in, pod_ip, ZT_R_IN_PLAIN, ZT_PC_IN);
}

/* The config, or NULL when the agent has not written it (callers fail closed). */
static __always_inline struct zt_config *cfg_ready(void)
{
	struct zt_config *cfg = cfg_get();
	if (!cfg || !cfg->ready) {
		reason_inc(ZT_R_DROP_NO_CONFIG);
		return 0;
	}
	return cfg;
}

#endif
