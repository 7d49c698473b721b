/* Every map of the capture programs, declared once, and the only code that
 * touches them. Maps are pinned under ZT_PIN_DIR (one directory per node, given
 * with -DZT_PIN_DIR by ztunnel_py/redirect/compile.py), so the three hook files,
 * compiled separately, share them, and they outlive the agent process.
 */
#ifndef ZT_MAPS_H
#define ZT_MAPS_H

#include "types.h"

#ifndef ZT_PIN_DIR
#error "compile with -DZT_PIN_DIR=\"/sys/fs/bpf/ztunnel-py/<node>/<hash>\""
#endif

BPF_TABLE_PINNED("array", int, struct zt_config, zt_cfg, 1, ZT_PIN_DIR "/zt_cfg");
BPF_TABLE_PINNED("hash", __u32, struct zt_pod, zt_pods, ZT_MAX_PODS, ZT_PIN_DIR "/zt_pods");
BPF_TABLE_PINNED("hash", __u32, __u32, zt_nodeips, ZT_MAX_NODE_IPS, ZT_PIN_DIR "/zt_nodeips");
BPF_TABLE_PINNED("percpu_array", int, __u64, zt_reasons, ZT_R_MAX, ZT_PIN_DIR "/zt_reasons");
BPF_TABLE_PINNED("hash", __u32, struct zt_pod_stats, zt_podstats, ZT_MAX_PODS,
		 ZT_PIN_DIR "/zt_podstats");

static __always_inline struct zt_config *cfg_get(void)
{
	int key = 0;
	struct zt_config *cfg = zt_cfg.lookup(&key);
	return cfg;
}

static __always_inline struct zt_pod *pod_get(__u32 ip)
{
	struct zt_pod *pod = zt_pods.lookup(&ip);
	return pod;
}

static __always_inline int is_node_ip(__u32 ip)
{
	__u32 *hit = zt_nodeips.lookup(&ip);
	return hit != 0;
}

static __always_inline void reason_inc(int reason)
{
	__u64 *n = zt_reasons.lookup(&reason);
	if (n)
		*n += 1; /* per-CPU slot: no atomic needed */
}

enum zt_pod_counter { ZT_PC_OUT, ZT_PC_IN, ZT_PC_EST, ZT_PC_DROP };

static __always_inline void podstat_inc(__u32 ip, enum zt_pod_counter which)
{
	struct zt_pod_stats *s = zt_podstats.lookup(&ip);
	if (!s)
		return;
	switch (which) {
	case ZT_PC_OUT:
		__sync_fetch_and_add(&s->out_captured, 1);
		break;
	case ZT_PC_IN:
		__sync_fetch_and_add(&s->in_captured, 1);
		break;
	case ZT_PC_EST:
		__sync_fetch_and_add(&s->established, 1);
		break;
	case ZT_PC_DROP:
		__sync_fetch_and_add(&s->dropped, 1);
		break;
	}
}

#endif
