/* Packet parsing for the tc programs: Ethernet + IPv4 + TCP, nothing else. */
#ifndef ZT_PARSE_H
#define ZT_PARSE_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>

/* One TCP/IPv4 packet, as the socket lookup wants it (network byte order). */
struct zt_tcp4 {
	struct bpf_sock_tuple tuple;
	__u8 syn;
	__u8 ack;
};

/* 0 and *out filled for TCP over IPv4, -1 for anything else. */
static __always_inline int parse_tcp4(struct __sk_buff *skb, struct zt_tcp4 *out)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return -1;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return -1;
	struct iphdr *iph = (void *)(eth + 1);
	if ((void *)(iph + 1) > data_end)
		return -1;
	if (iph->protocol != IPPROTO_TCP || iph->ihl < 5)
		return -1;
	if (iph->frag_off & bpf_htons(0x1fff))
		return -1; /* a later fragment has no TCP header */
	struct tcphdr *tcp = (void *)iph + iph->ihl * 4;
	if ((void *)(tcp + 1) > data_end)
		return -1;
	out->tuple.ipv4.saddr = iph->saddr;
	out->tuple.ipv4.daddr = iph->daddr;
	out->tuple.ipv4.sport = tcp->source;
	out->tuple.ipv4.dport = tcp->dest;
	out->syn = tcp->syn;
	out->ack = tcp->ack;
	return 0;
}

#endif
