/* Key and value types shared by the capture programs and userspace.
 *
 * ztunnel_py/redirect/maps.py mirrors every struct here with ctypes; keep the
 * two in step (field order, sizes, padding).
 */
#ifndef ZT_TYPES_H
#define ZT_TYPES_H

#define ZT_MAX_PODS 4096
#define ZT_MAX_NODE_IPS 64

/* Why a TCP packet was steered, passed or dropped (index into zt_reasons). */
enum zt_reason {
	ZT_R_OUT_CAPTURED = 0,   /* new outbound connection -> :15001 */
	ZT_R_IN_HBONE = 1,       /* new inbound connection to :15008 */
	ZT_R_IN_PLAIN = 2,       /* new inbound connection -> :15006 */
	ZT_R_ESTABLISHED = 3,    /* packet of a flow the agent already owns */
	ZT_R_DROP_NO_LISTENER = 4, /* fail closed: the agent's listener is gone */
	ZT_R_DROP_ASSIGN = 5,    /* fail closed: bpf_sk_assign refused */
	ZT_R_DROP_NO_CONFIG = 6, /* fail closed: zt_cfg not written yet */
	ZT_R_PASS_NODE = 7,      /* pod -> the node itself (kubelet, DNS on node) */
	ZT_R_PASS_MARK = 8,      /* the agent's own (marked) socket */
	ZT_R_PASS_NOT_ENROLLED = 9, /* neither end is an enrolled local pod */
	ZT_R_PASS_LOCAL = 10,    /* node-originated packet into a pod (health checks) */
	ZT_R_SAME_NODE = 11,     /* into an enrolled pod, turned back to ingress */
	ZT_R_DROP_SPOOFED = 12,  /* from a pod veth with the node's address, unmarked */
	ZT_R_MAX = 13,
};

/* zt_cfg[0]: written once by the agent at install. Addresses and ports are in
 * network byte order, as they appear in packets. */
struct zt_config {
	__u32 agent_mark;   /* SO_MARK of the agent's sockets: never captured */
	__u32 route_mark;   /* set on steered packets: `ip rule fwmark -> local` */
	__u32 listen_ip;    /* listeners' bind address, 0 = wildcard */
	__u16 port_out;     /* 15001 */
	__u16 port_in;      /* 15006 */
	__u16 port_hbone;   /* 15008 */
	__u16 ready;        /* 1 once the agent wrote this entry */
};

/* zt_pods[pod IPv4]: an enrolled pod on this node. */
struct zt_pod {
	__u32 ifindex;      /* its host-side veth in the node namespace */
	__u32 flags;        /* reserved */
};

/* zt_podstats[pod IPv4]: counters per enrolled pod. */
struct zt_pod_stats {
	__u64 out_captured;
	__u64 in_captured;
	__u64 established;
	__u64 dropped;
};

#endif
