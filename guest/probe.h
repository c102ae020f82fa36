/* The port-I/O contract between the workload guest and the VMM. Included by the guest's C
 * code and by mig's VMM (kvm/devices.cpp), so the two can never disagree. Every port takes a
 * 32-bit OUT. */
#ifndef MIG_GUEST_PROBE_H
#define MIG_GUEST_PROBE_H

/* Clear of every port QEMU's PC uses (fw_cfg's 0x510-0x51b is the nearest), so that the
 * guest, booted by QEMU, writes to no device there, and QEMU's trace shows every report. */
#define MIG_PROBE_FIRST 0x540
#define MIG_PROBE_HEARTBEAT 0x540   /* value: this vCPU's heartbeat sequence number, from 1 */
#define MIG_PROBE_TICKS 0x544       /* value: LAPIC timer ticks this vCPU has handled */
#define MIG_PROBE_CHECK_FAIL 0x548  /* value: a self-check failure code (below) */
#define MIG_PROBE_READY 0x54c       /* value: workload mode; sent once the working set is filled */
#define MIG_PROBE_SWEEP_PASS 0x550  /* value: completed sweep passes */
#define MIG_PROBE_DISK_CHECKS 0x554 /* value: disk blocks read back and found as last written */
#define MIG_PROBE_WORK 0x558        /* value: units of work done since the last report (a computing vCPU) */
#define MIG_PROBE_END 0x55c         /* one past the last port */

#define MIG_CHECK_FAIL_GPR 1    /* a general-purpose register changed under the guest */
#define MIG_CHECK_FAIL_VEC 2    /* an SSE/AVX register changed */
#define MIG_CHECK_FAIL_SWEEP 3  /* a sweep page did not hold the value it was left with */
#define MIG_CHECK_FAIL_TICKS 4  /* the timer stopped ticking */
#define MIG_CHECK_FAIL_TSC 5    /* the TSC went backwards */
#define MIG_CHECK_FAIL_EXCEPTION 6 /* the guest took an unexpected exception */
#define MIG_CHECK_FAIL_DISK_IO 7    /* the disk failed a request (or has no virtio-blk device) */
#define MIG_CHECK_FAIL_DISK_DATA 8  /* a disk block read back did not hold what was last written */

#endif
