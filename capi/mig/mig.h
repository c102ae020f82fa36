/* mig's C API: live migration for VMMs written in C, Rust, or anything else with a C FFI.
 *
 * A VM is a table of callbacks (mig_vm_ops) over memory the VMM has mapped; the engine
 * tracks dirty pages through them, pauses and resumes the VM, and moves its state as
 * opaque named sections. A migration is started on one side (mig_migration_start) towards
 * a receiver waiting on the other (mig_incoming_listen, or mig-recv for mig's own VMM),
 * observed (mig_migration_progress, events), steered (downtime, bandwidth, switchover,
 * cancel) and finished (mig_migration_wait).
 *
 * Conventions, for every function below unless it says otherwise:
 *  - Functions that can fail return a mig_result: MIG_OK, or a negative code; then
 *    mig_last_error() holds a one-line message for the calling thread.
 *  - Pointers given to mig are borrowed for the call only; strings are NUL-terminated UTF-8.
 *  - Handles (mig_vm, mig_migration, mig_incoming) are owned by the caller and freed with
 *    their _free function, which accepts NULL.
 *  - Sizes are bytes, times milliseconds and rates bytes per second.
 *  - Any thread may call; one handle may be used from several threads at once where the
 *    function says "thread-safe".
 *
 * This is C99 and uses no C++ type. Policies of one's own are not in this version of the API
 * (the C++ engine has them).
 *
 * Compatibility: MIG_API_VERSION only grows. Before mig 1.0 a new MINOR version may change
 * the layout of these structs (mig 0.10 grew mig_send_options, mig_recv_options, mig_outcome
 * and mig_vm_shape), so a program is rebuilt for it; the shared library's soname says so.
 */
#ifndef MIG_MIG_H
#define MIG_MIG_H

#include <stddef.h>
#include <stdint.h>

#include "mig/version.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- versions and errors ------------------------------------------------------------- */

/* The library's version, "MAJOR.MINOR.PATCH": the one actually linked, which may be newer
 * than the MIG_VERSION_STRING this program was compiled with. */
const char* mig_version(void);
/* MIG_API_VERSION of the linked library: compatible when it is >= the compiled one. */
int mig_api_version(void);

typedef enum mig_result {
  MIG_OK = 0,
  MIG_ERR_INVALID = -1,          /* a bad argument: NULL, an absurd value, a malformed URI */
  MIG_ERR_STATE = -2,            /* not now: e.g. cancel after the commit */
  MIG_ERR_CONNECT = -3,          /* the peer could not be reached, or refused us (TLS, credentials) */
  MIG_ERR_TIMEOUT = -4,          /* a wait ended before the migration did */
  MIG_ERR_FAILED = -5,           /* the migration failed; the source VM was resumed and runs on */
  MIG_ERR_CANCELLED = -6,        /* as FAILED, because mig_migration_cancel() asked */
  MIG_ERR_HANDOFF_UNKNOWN = -7,  /* the link broke after the commit: the destination may run the
                                    guest, so the source VM stays paused; never resume it blindly */
  MIG_ERR_INTERNAL = -8,         /* out of memory, or a bug in mig: the message says which */
  MIG_ERR_GUEST_LOST = -9        /* post-copy failed after the switch (given up while its link was
                                    broken): neither side holds the whole guest, so it is lost; the
                                    source VM stays paused and must never run again */
} mig_result;

/* "ok", "invalid", ... : the code's name. Never NULL. */
const char* mig_result_name(mig_result result);
/* The message of the calling thread's last failed call; "" when there was none. Valid until
 * this thread's next call into mig. */
const char* mig_last_error(void);

/* ---- a VM, as the engine sees it --------------------------------------------------------- */

typedef struct mig_memory_region {
  uint64_t guest_addr; /* guest-physical start, a multiple of MIG_PAGE_SIZE */
  uint64_t size;       /* a multiple of MIG_PAGE_SIZE */
  void* host;          /* the VMM's mapping of the whole region; valid while the mig_vm lives */
} mig_memory_region;

#define MIG_PAGE_SIZE 4096u

/* State the engine moves without looking into it. Names are unique within a VM; the version
 * lets an older source's sections be recognised by a newer destination. */
typedef struct mig_state_section {
  const char* name;
  uint32_t version;
  const void* data;
  size_t size;
} mig_state_section;

/* Where save_state puts its sections; valid only during that callback. mig copies `data`. */
typedef struct mig_state_writer mig_state_writer;
mig_result mig_state_add(mig_state_writer* writer, const char* name, uint32_t version, const void* data, size_t size);

/* The callbacks: mig's C++ engine::MigratableVm, as functions of the VMM's `opaque`. Each
 * returns 0 on success or a negative errno value, which fails the migration with a message
 * naming the callback; before the commit the source VM is then resumed. Callbacks run on
 * mig's threads (never two of one migration at once) and must not call back into the
 * migration they serve. */
typedef struct mig_vm_ops {
  /* Dirty tracking. After start, fetch_dirty_log sets bit p (word p / 64, bit p % 64) for
   * every page p of memory region `region` written since the previous fetch (or since start),
   * by the guest or by the VMM itself, and re-arms tracking for those pages. mig clears the
   * bitmap (`words` 64-bit words) before each call. */
  int (*start_dirty_log)(void* opaque);
  int (*stop_dirty_log)(void* opaque);
  int (*fetch_dirty_log)(void* opaque, size_t region, uint64_t* bitmap, size_t words);

  /* Source: pause returns once every vCPU has stopped; no guest write happens until resume.
   * Destination: resume also starts vCPUs that never ran. */
  int (*pause)(void* opaque);
  int (*resume)(void* opaque);

  /* With the VM paused. restore_state gets exactly the sections save_state added on the
   * source, in the same order; the pointers are valid during the call. */
  int (*save_state)(void* opaque, mig_state_writer* out);
  int (*restore_state)(void* opaque, const mig_state_section* sections, size_t count);

  /* Optional (NULL: not supported). Auto-converge: hold the vCPUs for `share` (0 to 1) of
   * the time from now on; 0 lets them run freely again. */
  int (*set_throttle)(void* opaque, double share);
} mig_vm_ops;

typedef struct mig_vm mig_vm;

/* Describes a VM to mig. `ops` and `regions` are copied; `opaque` is the VMM's and is
 * never freed by mig. The regions must stay mapped until mig_vm_free. */
mig_result mig_vm_new(const mig_vm_ops* ops, void* opaque, unsigned vcpus, const mig_memory_region* regions,
                      size_t region_count, mig_vm** out);
/* Frees the description (not the VMM's VM). Not while a migration uses it. */
void mig_vm_free(mig_vm* vm);

/* Optional callbacks that came after mig_vm_ops (which cannot grow without breaking programs
 * built against an older header), each set on a mig_vm by a function of its own. Not while a
 * migration uses the VM. */

/* Dirty-limit (MIG_API_VERSION 2), for the policy "dirty-limit" (QEMU 8.1's): from now on,
 * hold each vCPU that dirties memory faster than `bytes_per_second` to that rate, and let the
 * others run freely; 0 lifts the cap. A VMM needs to know which vCPU dirtied which page for
 * this (KVM's dirty ring). Return 0, or a negative errno value when it cannot: the policy then
 * goes on without its brake, as it does without the callback (NULL, the default). mig lifts
 * the cap when a migration fails or is cancelled. */
typedef int (*mig_vcpu_dirty_limit_fn)(void* opaque, double bytes_per_second);
mig_result mig_vm_set_vcpu_dirty_limit(mig_vm* vm, mig_vcpu_dirty_limit_fn set_vcpu_dirty_limit);

/* Same-host hand-over (MIG_API_VERSION 3): the VM's memory is in files, one per region (a
 * memfd, or a file on tmpfs or hugetlbfs), each region mapped MAP_SHARED from offset 0. Over a
 * unix: URI the destination then maps this very memory instead of receiving a copy (for a VMM
 * replaced in place): the guest pauses at the start, no page is sent, only state moves.
 * `count` is the VM's region count. mig neither dups nor closes the fds; they stay open
 * while the mig_vm lives. Not while a migration uses the VM. */
mig_result mig_vm_set_memory_fds(mig_vm* vm, const int* fds, size_t count);

/* Never-touched pages (MIG_API_VERSION 4). Round 0 sends only the pages that may hold data;
 * without this callback (NULL, the default) every page may, and round 0 reads the whole guest,
 * faulting in memory the guest never touched. The callback sets bit p of `bitmap` (`words`
 * 64-bit words, which mig clears before the call) for every page p of memory region `region`
 * that may hold non-zero data. A page left clear must read as zero; finding out must not fault
 * it in. Called once per region at the start of a migration, after dirty logging started.
 * mig_populated_pages answers it from the kernel; a VMM whose memory is filled lazily (from a
 * snapshot through userfaultfd, say) must also set the pages it has yet to fill. */
typedef int (*mig_populated_pages_fn)(void* opaque, size_t region, uint64_t* bitmap, size_t words);
mig_result mig_vm_set_populated_pages(mig_vm* vm, mig_populated_pages_fn populated_pages);

/* Sets bit p of `bitmap` (`words` 64-bit words; clears none) for every page p of
 * [host, host + size) that the kernel says was ever touched, without touching any: for private
 * anonymous memory (`fd` -1), the pages present or swapped out (/proc/self/pagemap); for a file
 * mapped MAP_SHARED from offset 0 (`fd`, a memfd or a file on tmpfs or hugetlbfs), the pages in
 * memory or in the file (mincore, SEEK_DATA). MIG_ERR_INVALID where the memory is mapped
 * otherwise (a private mapping of a file reads the file, not zero, where untouched): mig looks
 * at /proc/self/maps. `host` and `size` are multiples of MIG_PAGE_SIZE. */
mig_result mig_populated_pages(const void* host, uint64_t size, int fd, uint64_t* bitmap, size_t words);

/* Late re-arming (MIG_API_VERSION 5), as KVM's manual dirty-log protection allows
 * (KVM_GET_DIRTY_LOG then KVM_CLEAR_DIRTY_LOG). fetch_dirty_log_unarmed reports what
 * fetch_dirty_log does, but need not re-arm tracking for the pages it reports: every later
 * fetch, of either kind, may report them again, whatever the guest writes meanwhile, until
 * rearm_dirty_pages names them. That call re-arms page `first_page` + i of region `region`
 * for each bit i set in `pages` (`words` 64-bit words, none past the region's last page;
 * `first_page` a multiple of 64): a write after it returns must be reported by the next
 * fetch, and one before it need not be. mig re-arms a stretch of pages just before it reads
 * them to send them, while the guest runs (round 0 included), so a page the guest writes
 * between the fetch and its turn leaves once, with that write, rather than again in the next
 * round. Both callbacks, or neither (NULL, the default: the log is re-armed at each fetch,
 * always safe). */
typedef int (*mig_fetch_dirty_log_unarmed_fn)(void* opaque, size_t region, uint64_t* bitmap, size_t words);
typedef int (*mig_rearm_dirty_pages_fn)(void* opaque, size_t region, uint64_t first_page, const uint64_t* pages,
                                        size_t words);
mig_result mig_vm_set_late_rearm(mig_vm* vm, mig_fetch_dirty_log_unarmed_fn fetch_dirty_log_unarmed,
                                 mig_rearm_dirty_pages_fn rearm_dirty_pages);

/* ---- disks (MIG_API_VERSION 3) ----------------------------------------------------------- */

/* A guest disk, as the VMM serves it. Offsets and lengths are in bytes. */
typedef struct mig_disk_info {
  uint64_t size;        /* a multiple of 512, at most 16 TiB */
  uint64_t chunk_bytes; /* the unit of write tracking: a power of two from 4 KiB to 1 MiB */
  const char* path;     /* the image, for messages and for the destination's factory; copied.
                           NULL: "" */
} mig_disk_info;

/* Where data_extents puts its ranges; valid only during that callback. */
typedef struct mig_extent_writer mig_extent_writer;
mig_result mig_extent_add(mig_extent_writer* writer, uint64_t offset, uint64_t length);

/* The callbacks of one disk, as functions of its `opaque`; each returns 0 or a negative errno
 * value, as mig_vm_ops' do, and runs under the same rules (mig's threads, one at a time, with
 * the VM's callbacks too). */
typedef struct mig_disk_ops {
  /* Source, when disks are copied (mig_send_options.copy_storage). data_extents adds the ranges
   * that may hold data, found without reading the disk; everything else must read as zeros.
   * Optional: NULL claims the whole disk. While tracking is on, fetch_written sets bit c
   * (word c / 64, bit c % 64) for every chunk c that a completed guest write touched since
   * the previous fetch; mig clears the bitmap (`words` 64-bit words) before each call. While
   * the VM is paused no write may complete. */
  int (*data_extents)(void* opaque, mig_extent_writer* out);
  int (*track_writes)(void* opaque, int on);
  int (*fetch_written)(void* opaque, uint64_t* bitmap, size_t words);
  int (*read)(void* opaque, uint64_t offset, void* out, size_t length);
  /* Destination, when disks are copied: what arrives, in whole chunks (the last chunk may be
   * short). write_zeroes may leave a hole. */
  int (*write)(void* opaque, uint64_t offset, const void* data, size_t length);
  int (*write_zeroes)(void* opaque, uint64_t offset, uint64_t length);
  /* Shared storage, which one host at a time may write. release (source, paused) flushes the
   * image and gives its write lock up; reacquire takes it: on the destination before the
   * guest may run there, on the source again after a failure. Return -EBUSY while another
   * host holds it (the source tries again for 5 s). Optional, both or neither: NULL means
   * there is nothing to hand over. */
  int (*release)(void* opaque);
  int (*reacquire)(void* opaque);
} mig_disk_ops;

/* Adds a disk to the VM, after those added before (the order is the disks' identity: the
 * destination's VM must add the same disks in the same order). `ops` and `info` are copied;
 * `opaque` is the VMM's. At most 16 disks. Not while a migration uses the VM. How they move
 * is the migration's choice: mig_send_options.copy_storage. */
mig_result mig_vm_add_disk(mig_vm* vm, const mig_disk_ops* ops, void* opaque, const mig_disk_info* info);

/* ---- statuses, progress and events --------------------------------------------------- */

/* QEMU's migration statuses, in mig's order. */
typedef enum mig_status {
  MIG_STATUS_NONE,
  MIG_STATUS_SETUP,
  MIG_STATUS_ACTIVE,          /* pre-copy rounds, the guest running */
  MIG_STATUS_DEVICE,          /* stop-and-copy: the guest paused, its last pages and state travel */
  MIG_STATUS_POSTCOPY_ACTIVE, /* the destination runs the guest; the pages it lacks still come */
  MIG_STATUS_POSTCOPY_PAUSED, /* ... and the link broke: see mig_migration_recover_postcopy */
  MIG_STATUS_POSTCOPY_RECOVER,
  MIG_STATUS_COMPLETED,
  MIG_STATUS_FAILED,
  MIG_STATUS_CANCELLING,
  MIG_STATUS_CANCELLED,
  MIG_STATUS_HANDOFF_UNKNOWN
} mig_status;
/* "setup", "active", ... as query-migrate names them. Never NULL. */
const char* mig_status_name(mig_status status);

/* One finished pre-copy round. */
typedef struct mig_round {
  uint32_t round;                /* round 0 sends all memory */
  uint64_t pages_sent;
  uint64_t pages_skipped;        /* dirty, but unchanged since their last send */
  uint64_t bytes_sent;
  uint64_t dirty_pages;          /* found after the round: the next round's work */
  double duration_ms;
  double dirty_rate;             /* bytes per second the guest dirtied */
  double bandwidth;              /* bytes per second the round moved */
  double expected_downtime_ms;   /* what stopping after this round would cost */
  unsigned throttle_pct;         /* share of time the vCPUs were held (auto-converge) */
} mig_round;

typedef struct mig_progress {
  mig_status status;
  double elapsed_ms;
  uint64_t guest_bytes;
  uint64_t bytes_sent;           /* every wire byte so far; never decreases */
  uint64_t pages_sent;
  uint64_t pages_zero;           /* of pages_sent, sent as zero pages */
  uint64_t pages_skipped;
  uint64_t pages_remaining;      /* still to go in this round, plus dirtied since */
  uint32_t rounds;               /* finished pre-copy rounds */
  mig_round last_round;          /* the latest of them; zero before the first */
} mig_progress;

typedef enum mig_event_kind {
  MIG_EVENT_STATUS,              /* `status` is the new status */
  MIG_EVENT_ROUND,               /* `round` just finished */
  MIG_EVENT_GUEST_PAUSED,        /* the source paused the guest for the switchover */
  MIG_EVENT_GUEST_RESUMED        /* ... and resumed it again (a failure or a cancel) */
} mig_event_kind;

typedef struct mig_event {
  mig_event_kind kind;
  mig_status status;             /* MIG_EVENT_STATUS only; MIG_STATUS_NONE otherwise */
  mig_round round;               /* MIG_EVENT_ROUND only; zero otherwise */
} mig_event;

/* How a migration ended, seen from the side that asks. */
typedef struct mig_outcome {
  mig_status status;             /* COMPLETED, FAILED, CANCELLED or HANDOFF_UNKNOWN */
  char error[256];               /* why, when not COMPLETED; truncated to fit */
  double total_ms;
  double downtime_ms;            /* the source's pause to the destination's resume (source only) */
  uint32_t rounds;               /* including the final, paused round */
  uint64_t guest_bytes;
  uint64_t bytes;                /* sent (source) or received (destination), every wire byte */
  int verified;                  /* 1: the page hashes of both sides matched */
  int postcopy;                  /* 1: post-copy began (the source: it switched over; the
                                    destination: the guest ran here before it had every page) */
  uint32_t postcopy_recoveries;  /* reconnections after a broken post-copy link */
  int shared_memory;             /* 1: same-host hand-over: the memory was handed over, not copied */
} mig_outcome;

/* ---- the source ---------------------------------------------------------------------- */

typedef struct mig_send_options {
  double downtime_ms;       /* the pause the convergence check aims under (default 30) */
  double bandwidth;         /* pre-copy's limit, bytes per second; 0 = none (default) */
  unsigned max_rounds;      /* pre-copy rounds, round 0 included (default 30) */
  unsigned channels;        /* connections for page data, 1 to 16 (default 1); each carries
                               its share of guest memory on a thread of its own */
  int compress_level;       /* zstd level for page data; 0 = off (default) */
  int verify;               /* compare page hashes before the commit (default 1) */
  int auto_converge;        /* throttle a guest that dirties faster than the link (default 1;
                               needs set_throttle) */
  unsigned peer_timeout_ms; /* how long the receiver may stay silent (default 10000) */
  /* The convergence policy, "NAME[:key=value,...]" as mig-send(1) --policy takes it (mig,
   * qemu, xen, kubevirt-stall, ovirt-steps, dirty-limit: see mig_vm_set_vcpu_dirty_limit);
   * NULL (default): mig's, with the fields above. */
  const char* policy;
  /* The VM's disks (mig_vm_add_disk): 1 copies their data with the memory, round by round
   * (virsh migrate --copy-storage-all); 0 (default) leaves them on storage both hosts see and
   * moves only their write lock. */
  int copy_storage;
  /* Post-copy (default 0): offered to the receiver, with a connection of its own for the
   * pages the guest waits for there. The switch to it comes once round 0 is done and either
   * postcopy_after_ms of the migration have passed (negative, the default: not by time),
   * mig_migration_start_postcopy asks, or pre-copy does not converge. From the switch on the
   * destination runs the guest and only the source holds the pages it still lacks: a broken
   * link then pauses the migration (MIG_STATUS_POSTCOPY_PAUSED) until
   * mig_migration_recover_postcopy reconnects it. Disks do not take post-copy: their last
   * chunks go at the switch. */
  int postcopy;
  double postcopy_after_ms;
  /* TLS 1.3, both ends authenticated. At most one of the two credentials; both NULL
   * (default): plaintext. See mig-send(1) --tls-creds and --tls-psk for the files. */
  const char* tls_creds_dir;
  const char* tls_psk_file;
  const char* tls_hostname; /* the name the receiver's certificate must carry; NULL: the URI's host */
  /* Called on the migration's thread for each event; must return quickly and must not call
   * mig_migration_wait or mig_migration_free. NULL: no events. */
  void (*on_event)(void* event_opaque, const mig_event* event);
  void* event_opaque;
} mig_send_options;

/* Fills in the defaults above. Call it first, then change what you need. */
void mig_send_options_init(mig_send_options* options);

typedef struct mig_migration mig_migration;

/* Connects to `uri` ("tcp:HOST:PORT" or "unix:PATH"), with the TLS handshake where asked,
 * and starts migrating `vm` on a thread of its own; returns once connected. MIG_ERR_CONNECT:
 * nothing was touched and the VM runs on. `vm` must outlive the migration handle. */
mig_result mig_migration_start(mig_vm* vm, const char* uri, const mig_send_options* options, mig_migration** out);

/* The pre-flight check (MIG_API_VERSION 4; mig-send --check, QMP migrate's dry-run): tells the
 * receiver at `uri` about the guest - its shape, disks, and what a migration with `options`
 * would ask: channels, post-copy, over unix: the memory - as mig_migration_start would, and
 * returns its answer. Nothing of the VM changes and no page is sent; the receiver builds
 * nothing and goes on waiting for the real migration. Not checked: what only the
 * destination's VM knows (the factory may still refuse). MIG_OK: it would take the guest, as
 * `out` says. MIG_ERR_FAILED: it would not, and mig_last_error() says why. MIG_ERR_CONNECT:
 * it could not be reached, or did not answer within options->peer_timeout_ms. */
typedef struct mig_destination_check {
  unsigned channels; /* the page channels it would accept (fewer than asked: the rest go unused) */
  int postcopy;      /* 1: it would take the post-copy asked for; 0 where none was asked, or the
                        memory would be handed over (nothing is left to copy late) */
  int shared_memory; /* 1: it would take the guest's memory as it is (a same-host hand-over) */
} mig_destination_check;
mig_result mig_check_destination(mig_vm* vm, const char* uri, const mig_send_options* options, mig_destination_check* out);

/* Thread-safe. A consistent snapshot. */
mig_result mig_migration_progress(mig_migration* migration, mig_progress* out);
/* Thread-safe. Taken at the next round boundary (bandwidth: the next page batch). */
mig_result mig_migration_set_downtime(mig_migration* migration, double downtime_ms);
mig_result mig_migration_set_bandwidth(mig_migration* migration, double bytes_per_second);
/* Thread-safe. Stop pre-copying at the next round boundary, whatever the convergence says. */
mig_result mig_migration_force_switchover(mig_migration* migration);
/* Thread-safe. Asks the migration to stop and resume the source VM. MIG_ERR_STATE when it is
 * too late (the commit was sent) or the migration already ended. The outcome then comes
 * from mig_migration_wait. */
mig_result mig_migration_cancel(mig_migration* migration);
/* Thread-safe. Switch to post-copy once round 0 is done (migrate-start-postcopy); taken from
 * the moment mig_migration_start returned. MIG_ERR_STATE without options.postcopy, or once it
 * is too late to switch. */
mig_result mig_migration_start_postcopy(mig_migration* migration);
/* Thread-safe. Reconnects a postcopy-paused migration to the destination's recovery address
 * (mig_incoming_recovery_address there), with the TLS of the start; returns at once, and the
 * status says how it goes (back to POSTCOPY_ACTIVE, or POSTCOPY_PAUSED again to try once
 * more). MIG_ERR_STATE unless the status is MIG_STATUS_POSTCOPY_PAUSED. */
mig_result mig_migration_recover_postcopy(mig_migration* migration, const char* uri);

/* Blocks until the migration has ended or `timeout_ms` passed (negative: no limit), and
 * fills `out` (may be NULL) with the outcome. Returns MIG_OK when it completed: the
 * destination runs the guest and the source VM must never run again. Otherwise
 * MIG_ERR_TIMEOUT (still running), MIG_ERR_FAILED, MIG_ERR_CANCELLED,
 * MIG_ERR_HANDOFF_UNKNOWN or MIG_ERR_GUEST_LOST, as mig_result says. Thread-safe. */
mig_result mig_migration_wait(mig_migration* migration, int64_t timeout_ms, mig_outcome* out);

/* Cancels a migration that is still running, waits for its end, and frees the handle. A
 * migration in post-copy is past cancelling: this waits for it to complete, and gives it up
 * if its link breaks (at once, if it is paused now), which loses the guest. */
void mig_migration_free(mig_migration* migration);

/* ---- the destination ----------------------------------------------------------------- */

typedef struct mig_region_shape {
  uint64_t guest_addr;
  uint64_t size;
} mig_region_shape;

typedef struct mig_disk_shape {
  uint64_t size;
  uint64_t chunk_bytes;
  int copy;                /* 1: the data comes over the wire, into an image made here;
                              0: the image is shared, and only its write lock moves */
  const char* source_path; /* the image's path at the source */
} mig_disk_shape;

/* The sender's VM, for the destination to build an empty one like it. */
typedef struct mig_vm_shape {
  unsigned vcpus;
  size_t region_count;
  const mig_region_shape* regions;
  size_t disk_count;
  const mig_disk_shape* disks;
  /* Same-host hand-over: the source's memory, one fd per region, for the VM to map
   * (MAP_SHARED, from offset 0, the region's size) instead of allocating its own; borrowed for
   * this call (dup what you keep). mig refuses a VM whose regions do not map them. A memfd
   * not sealed against shrinking (F_SEAL_SHRINK) lets the source's process truncate it under
   * the guest; mig's own VMM refuses such a memfd, and a VMM should too. 0 and NULL otherwise. */
  size_t memory_fd_count;
  const int* memory_fds;
} mig_vm_shape;

/* Builds an empty, paused VM of `shape` (same regions, zero-filled memory, or the source's
 * memory when `shape` hands it over), describes it with mig_vm_new, and adds its disks
 * (mig_vm_add_disk: the same number, in the same order, each of the same size and
 * chunk_bytes; a copied disk reads as zeros until the data comes); ownership of the mig_vm
 * passes to mig. Returns NULL to refuse the guest
 * (the migration fails; mig_last_error on that thread, if set, says why). Runs on the
 * receiver's thread, once per incoming migration. */
typedef mig_vm* (*mig_vm_factory)(void* factory_opaque, const mig_vm_shape* shape);

typedef struct mig_recv_options {
  unsigned peer_timeout_ms;  /* how long the source may stay silent (default 10000) */
  int autostart;             /* resume the guest once here (default 1); 0 leaves it paused */
  uint64_t max_guest_bytes;  /* refuse larger guests at the handshake; 0 = no limit of ours */
  unsigned max_vcpus;        /* likewise; 0 = no limit of ours */
  /* TLS, as for the source; tls_authz: one client certificate subject (RFC 2253) allowed,
   * NULL allows any the CA signed. */
  const char* tls_creds_dir;
  const char* tls_psk_file;
  const char* tls_authz;
  /* Post-copy: 1 (default) takes it when a source offers it, where the VM's memory is private
   * anonymous memory (mig traps its missing pages with userfaultfd and drops stale ones with
   * MADV_DONTNEED; mig looks at the mappings) and autostart is on; 0 refuses it. A source that
   * asked for post-copy fails at once where it is refused, and runs on. */
  int postcopy;
  /* Where a post-copy source reconnects after its link broke ("tcp:HOST:PORT", port 0 picks
   * one; mig_incoming_recovery_address says which), listened on from the start. NULL
   * (default): no recovery, and a broken post-copy link loses the guest. */
  const char* recovery_uri;
  /* Same-host hand-over: 1 (default) takes the memory a source on this host offers (the
   * factory maps mig_vm_shape.memory_fds); 0 declines it, and the pages are copied, without
   * verification (a source offering its memory asks for none). */
  int share_memory;
} mig_recv_options;

void mig_recv_options_init(mig_recv_options* options);

typedef struct mig_incoming mig_incoming;

/* Listens on `uri` ("tcp:HOST:PORT", port 0 picks one, or "unix:PATH") and waits, on a
 * thread of its own, for one migration. A peer that fails the TLS handshake is refused, and a
 * source's dry run (mig-send --check) is answered; either way the wait goes on. */
mig_result mig_incoming_listen(const char* uri, const mig_recv_options* options, mig_vm_factory factory,
                               void* factory_opaque, mig_incoming** out);
/* What the source connects to, with the actual port. Valid while the handle lives. */
const char* mig_incoming_address(const mig_incoming* incoming);
/* Where a post-copy source reconnects (options.recovery_uri, with the actual port); "" without
 * one. Valid while the handle lives. */
const char* mig_incoming_recovery_address(const mig_incoming* incoming);
/* As mig_migration_wait; on MIG_OK the guest runs here (or waits, with autostart 0) in the
 * VM the factory built. In post-copy it returns once every page is here; while the link is
 * broken it waits on recovery_uri for the source. MIG_ERR_GUEST_LOST: post-copy failed after
 * the switch, and the guest here lacks pages it will never get. */
mig_result mig_incoming_wait(mig_incoming* incoming, int64_t timeout_ms, mig_outcome* out);
/* Stops listening, abandons a migration still arriving (its source keeps the guest; in
 * post-copy, the guest is lost), and frees the handle and the mig_vm the factory made; the
 * VMM's own VM is left alone. */
void mig_incoming_free(mig_incoming* incoming);

#ifdef __cplusplus
}
#endif

#endif /* MIG_MIG_H */
