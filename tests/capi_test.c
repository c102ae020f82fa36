/* The C API from C: migrations between two in-process fake VMs, whose "guest" is a thread
 * writing pages while it is not paused. Compiled as C99 with -pedantic, so the header is
 * checked to be C too. Each check prints what failed; the exit status is the verdict. */
#define _GNU_SOURCE /* memfd_create */

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "mig/mig.h"

static int failures;

#define CHECK(condition)                                                              \
  do {                                                                                \
    if (!(condition)) {                                                               \
      fprintf(stderr, "%s:%d: CHECK(%s) failed; last error: %s\n", __FILE__, __LINE__, \
              #condition, mig_last_error());                                          \
      ++failures;                                                                     \
    }                                                                                 \
  } while (0)

enum { kRegions = 2 };
static const uint64_t kRegionAddr[kRegions] = {0, 1ull << 30};
static const uint64_t kRegionSize[kRegions] = {4u << 20, 2u << 20};

/* A disk of 16 chunks of 64 KiB, in memory. */
enum { kChunkBytes = 64u << 10, kChunks = 16, kDiskBytes = kChunkBytes * kChunks };

typedef struct fake_disk {
  unsigned char* data;          /* NULL: the VM has no disk */
  uint64_t allocated;           /* bit c: chunk c may hold data (a sparse image's extents) */
  uint64_t written;             /* bit c: chunk c written since the last fetch */
  int tracking, held;           /* held: this side has the image's write lock */
  int fail_reacquire;           /* reacquire returns -EBUSY: another host holds the lock */
  int reads, writes, zeroes;    /* calls of each */
} fake_disk;

typedef struct fake_vm {
  pthread_mutex_t lock;
  fake_disk disk;
  mig_memory_region regions[kRegions];
  uint64_t* written[kRegions]; /* the dirty log: pages written since the last fetch */
  int logging, paused, stopping;
  int resumes;
  uint64_t writes;            /* the "vCPU state" that travels as a section */
  int fail_save_state;        /* save_state returns -EIO */
  int has_writer;
  pthread_t writer;
  double dirty_limit;          /* bytes per second the guest may dirty; 0: no cap */
  int dirty_limit_calls;
  double first_dirty_limit;   /* what the first call asked for */
  int mapped;                 /* the regions map files (same-host hand-over), not the heap */
  int memfds[kRegions];       /* those files, where this VM made them; -1 otherwise */
  int touch_on_resume;        /* a destination's guest reads every page once it runs */
  int has_toucher;
  pthread_t toucher;
  int populated_calls;        /* of the populated-pages callback */
  int armed_fetches;          /* calls of fetch_dirty_log, which re-arms at the fetch */
  int rearms;                 /* calls of the late re-arming callback */
  int misplaced_rearms;       /* ... naming pages unaligned or outside the region */
  int fail_rearm;             /* it returns -EIO */
  int writes_at_start;        /* pages start_dirty_log writes once logging is on */
} fake_vm;

static void sleep_us(long us) {
  struct timespec t = {us / 1000000, (us % 1000000) * 1000};
  nanosleep(&t, NULL);
}

static uint64_t pages_of(size_t region) { return kRegionSize[region] / MIG_PAGE_SIZE; }

/* The guest: writes its write count into one page after another while it runs, one page
 * per 20 us, or slower under a dirty limit. */
static void* guest_writes(void* arg) {
  fake_vm* vm = arg;
  long pause_us = 20;
  for (;;) {
    sleep_us(pause_us);
    pthread_mutex_lock(&vm->lock);
    if (vm->stopping) break;
    if (!vm->paused) {
      const size_t region = (size_t)(vm->writes % kRegions);
      const uint64_t page = (vm->writes * 7919u) % pages_of(region);
      unsigned char* host = vm->regions[region].host;
      memcpy(host + page * MIG_PAGE_SIZE + (vm->writes % 512) * 8, &vm->writes, sizeof vm->writes);
      if (vm->logging) vm->written[region][page / 64] |= 1ull << (page % 64);
      if (vm->disk.data && vm->writes % 16 == 0) { /* every 16th write goes to the disk's second half */
        const uint64_t chunk = kChunks / 2 + (vm->writes / 16 * 5) % (kChunks / 2);
        memcpy(vm->disk.data + chunk * kChunkBytes + (vm->writes % 8192) * 8, &vm->writes, sizeof vm->writes);
        vm->disk.allocated |= 1ull << chunk;
        if (vm->disk.tracking) vm->disk.written |= 1ull << chunk;
      }
      ++vm->writes;
    }
    pause_us = vm->dirty_limit > 0 ? (long)(MIG_PAGE_SIZE * 1e6 / vm->dirty_limit) : 20;
    pthread_mutex_unlock(&vm->lock);
  }
  pthread_mutex_unlock(&vm->lock);
  return NULL;
}

/* A destination's guest in post-copy: reads a byte of every third page, as a guest touches
 * memory the source may still hold; each missing page traps until it is here (the others
 * come in the background). */
static void* guest_touches(void* arg) {
  fake_vm* vm = arg;
  volatile unsigned char sum = 0;
  size_t r;
  uint64_t page;
  for (r = 0; r < kRegions; ++r)
    for (page = 0; page < pages_of(r); page += 3)
      sum = (unsigned char)(sum + ((volatile unsigned char*)vm->regions[r].host)[page * MIG_PAGE_SIZE]);
  (void)sum;
  return NULL;
}

/* Sets one of the VM's flags as the guest sees it: between two of its writes. */
static int set_locked(fake_vm* vm, int* flag, int value) {
  pthread_mutex_lock(&vm->lock);
  *flag = value;
  pthread_mutex_unlock(&vm->lock);
  return 0;
}

/* Logging starts; then the guest writes `writes_at_start` pages of region 0, every third
 * one, each before round 0 reads it. */
static int fake_start_dirty_log(void* opaque) {
  fake_vm* vm = opaque;
  int i;
  pthread_mutex_lock(&vm->lock);
  vm->logging = 1;
  for (i = 0; i < vm->writes_at_start; ++i) {
    const uint64_t page = 3u * (uint64_t)i;
    memset((unsigned char*)vm->regions[0].host + page * MIG_PAGE_SIZE, 0xa5, 64);
    vm->written[0][page / 64] |= 1ull << (page % 64);
  }
  pthread_mutex_unlock(&vm->lock);
  return 0;
}

static int fake_stop_dirty_log(void* opaque) { return set_locked(opaque, &((fake_vm*)opaque)->logging, 0); }

static int fake_fetch_dirty_log(void* opaque, size_t region, uint64_t* bitmap, size_t words) {
  fake_vm* vm = opaque;
  size_t w;
  if (region >= kRegions || words != (pages_of(region) + 63) / 64) return -EINVAL;
  pthread_mutex_lock(&vm->lock);
  ++vm->armed_fetches;
  for (w = 0; w < words; ++w) {
    bitmap[w] = vm->written[region][w];
    vm->written[region][w] = 0;
  }
  pthread_mutex_unlock(&vm->lock);
  return 0;
}

/* Late re-arming, as KVM's manual protection does it: a fetch leaves the log as it is; a
 * page's bit stays set until re-armed (writes meanwhile set nothing new), and a write after
 * that sets it again. */
static int fake_fetch_dirty_log_unarmed(void* opaque, size_t region, uint64_t* bitmap, size_t words) {
  fake_vm* vm = opaque;
  if (region >= kRegions || words != (pages_of(region) + 63) / 64) return -EINVAL;
  pthread_mutex_lock(&vm->lock);
  memcpy(bitmap, vm->written[region], words * sizeof *bitmap);
  pthread_mutex_unlock(&vm->lock);
  return 0;
}

static int fake_rearm_dirty_pages(void* opaque, size_t region, uint64_t first_page, const uint64_t* pages, size_t words) {
  fake_vm* vm = opaque;
  size_t w;
  int rc;
  pthread_mutex_lock(&vm->lock);
  ++vm->rearms;
  if (region >= kRegions || first_page % 64 != 0 || first_page / 64 + words > (pages_of(region) + 63) / 64) {
    ++vm->misplaced_rearms;
  } else {
    for (w = 0; w < words; ++w) vm->written[region][first_page / 64 + w] &= ~pages[w];
  }
  rc = vm->fail_rearm ? -EIO : 0;
  pthread_mutex_unlock(&vm->lock);
  return rc;
}

static int fake_pause(void* opaque) { return set_locked(opaque, &((fake_vm*)opaque)->paused, 1); }

static int fake_resume(void* opaque) {
  fake_vm* vm = opaque;
  pthread_mutex_lock(&vm->lock);
  vm->paused = 0;
  ++vm->resumes;
  if (vm->touch_on_resume && !vm->has_toucher) vm->has_toucher = pthread_create(&vm->toucher, NULL, guest_touches, vm) == 0;
  pthread_mutex_unlock(&vm->lock);
  return 0;
}

static int fake_save_state(void* opaque, mig_state_writer* out) {
  fake_vm* vm = opaque;
  const char registers[] = "rip=0x1000 rflags=0x2";
  if (vm->fail_save_state) return -EIO;
  if (mig_state_add(out, "fake.writes", 1, &vm->writes, sizeof vm->writes) != MIG_OK) return -ENOMEM;
  if (mig_state_add(out, "fake.registers", 3, registers, sizeof registers) != MIG_OK) return -ENOMEM;
  return 0;
}

static int fake_restore_state(void* opaque, const mig_state_section* sections, size_t count) {
  fake_vm* vm = opaque;
  if (count != 2 || strcmp(sections[0].name, "fake.writes") != 0 || sections[0].version != 1 ||
      sections[0].size != sizeof vm->writes || strcmp(sections[1].name, "fake.registers") != 0 ||
      sections[1].version != 3 || strcmp(sections[1].data, "rip=0x1000 rflags=0x2") != 0)
    return -EPROTO;
  memcpy(&vm->writes, sections[0].data, sizeof vm->writes);
  return 0;
}

static int fake_set_vcpu_dirty_limit(void* opaque, double bytes_per_second) {
  fake_vm* vm = opaque;
  pthread_mutex_lock(&vm->lock);
  if (vm->dirty_limit_calls++ == 0) vm->first_dirty_limit = bytes_per_second;
  vm->dirty_limit = bytes_per_second;
  pthread_mutex_unlock(&vm->lock);
  return 0;
}

/* The disk's callbacks. Those a source calls take the VM's lock, as its guest writes the
 * disk too; nothing else writes a destination's while the data comes. */
static int disk_extents(void* opaque, mig_extent_writer* out) {
  fake_vm* vm = opaque;
  int c, rc = 0;
  pthread_mutex_lock(&vm->lock);
  for (c = 0; c < kChunks && rc == 0; ++c)
    if (vm->disk.allocated >> c & 1) rc = mig_extent_add(out, (uint64_t)c * kChunkBytes, kChunkBytes) == MIG_OK ? 0 : -EINVAL;
  pthread_mutex_unlock(&vm->lock);
  return rc;
}

static int disk_track_writes(void* opaque, int on) { return set_locked(opaque, &((fake_vm*)opaque)->disk.tracking, on); }

static int disk_fetch_written(void* opaque, uint64_t* bitmap, size_t words) {
  fake_vm* vm = opaque;
  if (words != 1 || bitmap[0] != 0) return -EINVAL;
  pthread_mutex_lock(&vm->lock);
  bitmap[0] = vm->disk.written;
  vm->disk.written = 0;
  pthread_mutex_unlock(&vm->lock);
  return 0;
}

static int disk_in_range(uint64_t offset, uint64_t length) {
  return offset % kChunkBytes == 0 && offset <= kDiskBytes && length <= kDiskBytes - offset;
}

static int disk_read(void* opaque, uint64_t offset, void* out, size_t length) {
  fake_vm* vm = opaque;
  if (!disk_in_range(offset, length)) return -EINVAL;
  pthread_mutex_lock(&vm->lock);
  memcpy(out, vm->disk.data + offset, length);
  ++vm->disk.reads;
  pthread_mutex_unlock(&vm->lock);
  return 0;
}

static int disk_write(void* opaque, uint64_t offset, const void* data, size_t length) {
  fake_vm* vm = opaque;
  if (!disk_in_range(offset, length)) return -EINVAL;
  memcpy(vm->disk.data + offset, data, length);
  ++vm->disk.writes;
  return 0;
}

static int disk_write_zeroes(void* opaque, uint64_t offset, uint64_t length) {
  fake_vm* vm = opaque;
  if (!disk_in_range(offset, length)) return -EINVAL;
  memset(vm->disk.data + offset, 0, length);
  ++vm->disk.zeroes;
  return 0;
}

static int disk_release(void* opaque) { return set_locked(opaque, &((fake_vm*)opaque)->disk.held, 0); }

static int disk_reacquire(void* opaque) {
  fake_vm* vm = opaque;
  if (vm->disk.fail_reacquire) return -EBUSY;
  return set_locked(vm, &vm->disk.held, 1);
}

static const mig_disk_ops disk_ops = {disk_extents, disk_track_writes, disk_fetch_written, disk_read,
                                      disk_write,   disk_write_zeroes, disk_release,       disk_reacquire};

/* Gives the VM its disk: a source's holds data in its first half but for chunk 3, which
 * reads as zeros, and its guest writes the second half, a hole at first; a destination's is
 * all zeros until the data comes. */
static void fake_disk_attach(fake_vm* vm, mig_vm* described, int with_data) {
  const mig_disk_info info = {kDiskBytes, kChunkBytes, "fake.img"};
  pthread_mutex_lock(&vm->lock);
  vm->disk.data = calloc(kDiskBytes, 1);
  if (with_data) memset(vm->disk.data, 0x33, kDiskBytes / 2);
  memset(vm->disk.data + 3 * kChunkBytes, 0, kChunkBytes);
  vm->disk.allocated = with_data ? (1ull << kChunks / 2) - 1 : 0;
  vm->disk.held = with_data;
  pthread_mutex_unlock(&vm->lock);
  CHECK(mig_vm_add_disk(described, &disk_ops, vm, &info) == MIG_OK);
}

static const mig_vm_ops fake_ops = {fake_start_dirty_log, fake_stop_dirty_log, fake_fetch_dirty_log, fake_pause,
                                    fake_resume,          fake_save_state,     fake_restore_state,   NULL};

/* Memory of the test's shape: a source's holds data (no zero pages to skip), and its guest
 * starts writing at once; a destination's is zero-filled. With `memfds` (one per region) the
 * regions map those files instead: a destination's as they are, the source's memory. */
static fake_vm* fake_vm_on(int with_writer, const int* memfds) {
  size_t r;
  fake_vm* vm = calloc(1, sizeof *vm);
  pthread_mutex_init(&vm->lock, NULL);
  vm->mapped = memfds != NULL;
  for (r = 0; r < kRegions; ++r) {
    void* host = NULL;
    vm->memfds[r] = -1;
    if (memfds) host = mmap(NULL, kRegionSize[r], PROT_READ | PROT_WRITE, MAP_SHARED, memfds[r], 0);
    else if (posix_memalign(&host, MIG_PAGE_SIZE, kRegionSize[r]) != 0) host = MAP_FAILED;
    if (host == MAP_FAILED) abort();
    if (!memfds || with_writer) memset(host, with_writer ? 0x5a : 0, kRegionSize[r]);
    vm->regions[r].guest_addr = kRegionAddr[r];
    vm->regions[r].size = kRegionSize[r];
    vm->regions[r].host = host;
    vm->written[r] = calloc((pages_of(r) + 63) / 64, sizeof(uint64_t));
  }
  vm->paused = !with_writer;
  vm->has_writer = with_writer;
  if (with_writer) pthread_create(&vm->writer, NULL, guest_writes, vm);
  return vm;
}

static fake_vm* fake_vm_new(int with_writer) { return fake_vm_on(with_writer, NULL); }

/* A VM whose memory is in memfds, which it owns: a source's can be handed over on this host. */
static fake_vm* fake_vm_in_memfds(int with_writer) {
  int memfds[kRegions];
  size_t r;
  fake_vm* vm;
  for (r = 0; r < kRegions; ++r) {
    memfds[r] = memfd_create("capi-test", MFD_CLOEXEC);
    if (memfds[r] < 0 || ftruncate(memfds[r], (off_t)kRegionSize[r]) != 0) abort();
  }
  vm = fake_vm_on(with_writer, memfds);
  for (r = 0; r < kRegions; ++r) vm->memfds[r] = memfds[r];
  return vm;
}

static void fake_vm_free(fake_vm* vm) {
  size_t r;
  if (!vm) return;
  if (vm->has_writer) {
    pthread_mutex_lock(&vm->lock);
    vm->stopping = 1;
    pthread_mutex_unlock(&vm->lock);
    pthread_join(vm->writer, NULL);
  }
  if (vm->has_toucher) pthread_join(vm->toucher, NULL);
  for (r = 0; r < kRegions; ++r) {
    if (vm->mapped) munmap(vm->regions[r].host, kRegionSize[r]);
    else free(vm->regions[r].host);
    if (vm->memfds[r] >= 0) close(vm->memfds[r]);
    free(vm->written[r]);
  }
  free(vm->disk.data);
  pthread_mutex_destroy(&vm->lock);
  free(vm);
}

static mig_vm* describe(fake_vm* vm) {
  mig_vm* described = NULL;
  CHECK(mig_vm_new(&fake_ops, vm, 1, vm->regions, kRegions, &described) == MIG_OK);
  return described;
}

/* The destination's factory: a fake VM of the sender's shape, or a refusal. */
typedef struct destination {
  fake_vm* vm;
  int refuse;
  int skip_disks;        /* build the VM without the disks the shape has */
  int fail_reacquire;    /* its disk's lock stays another host's */
  int touch;             /* its guest touches pages once it runs (post-copy) */
  int no_recovery;       /* listen without a recovery address */
  int decline_memory;    /* decline a same-host source's memory: copy it */
  int ignore_memory;     /* take it, and build the VM on memory of its own all the same */
  int in_memfds;         /* build the VM's memory in memfds of its own */
  const char* uri;       /* where it listens; NULL: a TCP port of its own */
  mig_disk_shape disk;   /* the shape's disk, when it had one */
} destination;

static mig_vm* make_destination_vm(void* opaque, const mig_vm_shape* shape) {
  destination* d = opaque;
  mig_vm* described;
  size_t r;
  if (d->refuse || shape->vcpus != 1 || shape->region_count != kRegions || shape->disk_count > 1) return NULL;
  for (r = 0; r < kRegions; ++r)
    if (shape->regions[r].guest_addr != kRegionAddr[r] || shape->regions[r].size != kRegionSize[r]) return NULL;
  if (shape->memory_fd_count != 0 && shape->memory_fd_count != kRegions) return NULL;
  if (d->in_memfds) d->vm = fake_vm_in_memfds(0);
  else d->vm = fake_vm_on(0, shape->memory_fd_count && !d->ignore_memory ? shape->memory_fds : NULL);
  d->vm->touch_on_resume = d->touch;
  described = describe(d->vm);
  if (shape->disk_count == 1) {
    d->disk = shape->disks[0];
    d->disk.source_path = NULL; /* valid only during this call */
    d->vm->disk.fail_reacquire = d->fail_reacquire;
    if (!d->skip_disks) fake_disk_attach(d->vm, described, 0);
  }
  return described;
}

typedef struct events {
  pthread_mutex_t lock;
  int rounds, completed, paused;
} events;

static void count_event(void* opaque, const mig_event* event) {
  events* e = opaque;
  pthread_mutex_lock(&e->lock);
  if (event->kind == MIG_EVENT_ROUND) ++e->rounds;
  if (event->kind == MIG_EVENT_STATUS && event->status == MIG_STATUS_COMPLETED) ++e->completed;
  if (event->kind == MIG_EVENT_GUEST_PAUSED) ++e->paused;
  pthread_mutex_unlock(&e->lock);
}

static mig_incoming* listen_for(destination* d) {
  mig_recv_options options;
  mig_incoming* incoming = NULL;
  mig_recv_options_init(&options);
  if (!d->no_recovery) options.recovery_uri = "tcp:127.0.0.1:0";
  options.share_memory = !d->decline_memory;
  CHECK(mig_incoming_listen(d->uri ? d->uri : "tcp:127.0.0.1:0", &options, make_destination_vm, d, &incoming) == MIG_OK);
  return incoming;
}

/* What each test migrates: a source whose guest writes, and a destination listening for it. */
typedef struct pair {
  fake_vm* source;
  mig_vm* source_vm;
  destination d; /* the destination factory's: the pair must stay where it was opened */
  mig_incoming* incoming;
  mig_migration* migration;
} pair;

/* A pair whose source is `source` (NULL: a new one, its memory on the heap). */
static void pair_open_to(pair* p, destination how, fake_vm* source) {
  p->source = source ? source : fake_vm_new(1);
  p->source_vm = describe(p->source);
  p->d = how;
  p->incoming = listen_for(&p->d);
  p->migration = NULL;
}

static void pair_open(pair* p, int refuse) {
  destination how;
  memset(&how, 0, sizeof how);
  how.refuse = refuse;
  pair_open_to(p, how, NULL);
}

static void pair_start(pair* p, const mig_send_options* options) {
  CHECK(mig_migration_start(p->source_vm, mig_incoming_address(p->incoming), options, &p->migration) == MIG_OK);
}

static void pair_close(pair* p) {
  mig_migration_free(p->migration);
  mig_incoming_free(p->incoming);
  mig_vm_free(p->source_vm);
  fake_vm_free(p->source);
  fake_vm_free(p->d.vm);
}

/* The source's log was re-armed late exactly when the test asked for it, and only at pages
 * mig may name. */
static void check_rearmed_late(const fake_vm* source, int late_rearm) {
  if (late_rearm) CHECK(source->rearms > 0 && source->armed_fetches == 0);
  else CHECK(source->rearms == 0 && source->armed_fetches > 0);
  CHECK(source->misplaced_rearms == 0);
}

/* With `late_rearm`, the source's dirty log is re-armed through mig_vm_set_late_rearm. */
static void test_live_migration(unsigned channels, const char* policy, int late_rearm) {
  pair p;
  events seen = {PTHREAD_MUTEX_INITIALIZER, 0, 0, 0};
  mig_send_options options;
  mig_outcome sent, received;
  mig_progress progress;
  size_t r;

  pair_open(&p, 0);
  if (late_rearm)
    CHECK(mig_vm_set_late_rearm(p.source_vm, fake_fetch_dirty_log_unarmed, fake_rearm_dirty_pages) == MIG_OK);
  sleep_us(20000); /* let the guest write for a while first */
  mig_send_options_init(&options);
  options.channels = channels;
  options.policy = policy;
  options.on_event = count_event;
  options.event_opaque = &seen;
  pair_start(&p, &options);
  CHECK(mig_migration_wait(p.migration, 60000, &sent) == MIG_OK);
  CHECK(sent.status == MIG_STATUS_COMPLETED && sent.verified == 1 && sent.rounds >= 2);
  CHECK(sent.guest_bytes == kRegionSize[0] + kRegionSize[1] && sent.bytes > 0 && sent.error[0] == '\0');
  CHECK(mig_incoming_wait(p.incoming, 60000, &received) == MIG_OK);
  CHECK(received.status == MIG_STATUS_COMPLETED && received.verified == 1);

  CHECK(mig_migration_progress(p.migration, &progress) == MIG_OK);
  CHECK(progress.status == MIG_STATUS_COMPLETED && progress.bytes_sent > 0);
  CHECK(progress.rounds >= 1 && progress.last_round.pages_sent > 0);
  pthread_mutex_lock(&seen.lock);
  CHECK(seen.rounds >= 1 && seen.completed == 1 && seen.paused == 1);
  pthread_mutex_unlock(&seen.lock);

  /* The guest moved: the source stays paused, and both sides hold the same memory and state. */
  CHECK(p.source->paused && p.d.vm && !p.d.vm->paused && p.d.vm->resumes == 1);
  CHECK(p.d.vm && p.d.vm->writes == p.source->writes && p.source->writes > 0);
  for (r = 0; p.d.vm && r < kRegions; ++r)
    CHECK(memcmp(p.source->regions[r].host, p.d.vm->regions[r].host, kRegionSize[r]) == 0);
  CHECK(mig_migration_cancel(p.migration) == MIG_ERR_STATE);
  check_rearmed_late(p.source, late_rearm);
  pair_close(&p);
}

/* A slow migration is cancelled; the guest runs on at the source, the destination discards. */
static void test_cancel(void) {
  pair p;
  mig_send_options options;
  mig_progress progress;
  mig_outcome outcome;
  uint64_t writes_before;
  int i;

  pair_open(&p, 0);
  mig_send_options_init(&options);
  options.bandwidth = 1 << 20; /* round 0 alone takes about 6 s */
  pair_start(&p, &options);
  for (i = 0; i < 500; ++i) {
    CHECK(mig_migration_progress(p.migration, &progress) == MIG_OK);
    if (progress.status == MIG_STATUS_ACTIVE && progress.bytes_sent > 0) break;
    sleep_us(10000);
  }
  CHECK(progress.status == MIG_STATUS_ACTIVE);
  CHECK(mig_migration_wait(p.migration, 0, NULL) == MIG_ERR_TIMEOUT);
  CHECK(mig_migration_set_downtime(p.migration, 50) == MIG_OK);
  CHECK(mig_migration_set_downtime(p.migration, -1) == MIG_ERR_INVALID);
  CHECK(mig_migration_start_postcopy(p.migration) == MIG_ERR_STATE); /* not enabled */
  CHECK(mig_migration_recover_postcopy(p.migration, "tcp:127.0.0.1:1") == MIG_ERR_STATE);
  CHECK(mig_migration_cancel(p.migration) == MIG_OK);
  CHECK(mig_migration_wait(p.migration, 30000, &outcome) == MIG_ERR_CANCELLED);
  CHECK(outcome.status == MIG_STATUS_CANCELLED && strstr(outcome.error, "cancel") != NULL);
  CHECK(mig_incoming_wait(p.incoming, 30000, &outcome) == MIG_ERR_FAILED);
  CHECK(outcome.status == MIG_STATUS_FAILED && outcome.error[0] != '\0');

  pthread_mutex_lock(&p.source->lock);
  writes_before = p.source->writes;
  pthread_mutex_unlock(&p.source->lock);
  sleep_us(20000);
  pthread_mutex_lock(&p.source->lock);
  CHECK(!p.source->paused && p.source->writes > writes_before && !p.source->logging);
  pthread_mutex_unlock(&p.source->lock);
  pair_close(&p);
}

/* dirty-limit through its callback: the guest dirties its 6 MiB every round, far faster than
 * the 20 MB/s link drains it, until the policy caps it (at 1 MB/s, its default). With
 * `fail_save_state`, the migration fails after the cap came, and the cap is lifted. */
static void test_dirty_limit(int fail_save_state) {
  pair p;
  mig_send_options options;
  mig_outcome sent, received;

  pair_open(&p, 0);
  CHECK(mig_vm_set_vcpu_dirty_limit(NULL, fake_set_vcpu_dirty_limit) == MIG_ERR_INVALID);
  CHECK(mig_vm_set_vcpu_dirty_limit(p.source_vm, fake_set_vcpu_dirty_limit) == MIG_OK);
  p.source->fail_save_state = fail_save_state;
  mig_send_options_init(&options);
  options.policy = "dirty-limit";
  options.bandwidth = 20e6;
  pair_start(&p, &options);
  if (fail_save_state) {
    CHECK(mig_migration_wait(p.migration, 60000, &sent) == MIG_ERR_FAILED);
    CHECK(strstr(sent.error, "save_state failed") != NULL);
  } else {
    CHECK(mig_migration_wait(p.migration, 60000, &sent) == MIG_OK);
    CHECK(sent.status == MIG_STATUS_COMPLETED && sent.verified == 1);
    CHECK(mig_incoming_wait(p.incoming, 60000, &received) == MIG_OK);
    CHECK(received.status == MIG_STATUS_COMPLETED && received.verified == 1);
  }
  pthread_mutex_lock(&p.source->lock);
  CHECK(p.source->dirty_limit_calls >= 1 && p.source->first_dirty_limit == 1e6);
  if (fail_save_state) CHECK(!p.source->paused && p.source->dirty_limit == 0 && p.source->dirty_limit_calls == 2);
  pthread_mutex_unlock(&p.source->lock);
  pair_close(&p);
}

/* A disk that moves with the guest, its data copied (`copy`) or its lock handed over. */
static void test_storage(int copy) {
  pair p;
  mig_send_options options;
  mig_outcome sent, received;

  pair_open(&p, 0);
  fake_disk_attach(p.source, p.source_vm, 1);
  sleep_us(20000);
  mig_send_options_init(&options);
  options.copy_storage = copy;
  pair_start(&p, &options);
  CHECK(mig_migration_wait(p.migration, 60000, &sent) == MIG_OK);
  CHECK(sent.status == MIG_STATUS_COMPLETED && sent.verified == 1);
  CHECK(mig_incoming_wait(p.incoming, 60000, &received) == MIG_OK);
  CHECK(received.status == MIG_STATUS_COMPLETED && received.verified == 1);
  CHECK(p.d.disk.size == kDiskBytes && p.d.disk.chunk_bytes == kChunkBytes && p.d.disk.copy == copy);
  CHECK(p.d.vm && p.d.vm->disk.data && !p.source->disk.tracking);
  if (p.d.vm && p.d.vm->disk.data && copy) {
    /* Round 0 read the first half; chunk 3 came as zeros; the guest's writes came after. */
    CHECK(memcmp(p.source->disk.data, p.d.vm->disk.data, kDiskBytes) == 0);
    CHECK(p.source->disk.reads >= 1 && p.d.vm->disk.writes >= 1 && p.d.vm->disk.zeroes >= 1);
    CHECK(p.source->disk.held && !p.d.vm->disk.held); /* a copy's lock never moves */
  } else if (p.d.vm && p.d.vm->disk.data) {
    CHECK(p.source->disk.reads == 0 && p.d.vm->disk.writes == 0 && p.d.vm->disk.zeroes == 0);
    CHECK(!p.source->disk.held && p.d.vm->disk.held);
  }
  pair_close(&p);
}

/* A disk the destination cannot take: the migration fails before the commit, and the source
 * runs on with its disk, lock and all. */
static void test_storage_refused(int copy, int skip_disks, int fail_reacquire, const char* expected) {
  pair p;
  mig_send_options options;
  mig_outcome outcome;

  pair_open(&p, 0);
  p.d.skip_disks = skip_disks;
  p.d.fail_reacquire = fail_reacquire;
  fake_disk_attach(p.source, p.source_vm, 1);
  mig_send_options_init(&options);
  options.copy_storage = copy;
  pair_start(&p, &options);
  CHECK(mig_migration_wait(p.migration, 60000, &outcome) == MIG_ERR_FAILED);
  CHECK(strstr(outcome.error, expected) != NULL);
  if (!strstr(outcome.error, expected)) fprintf(stderr, "  the error was: %s\n", outcome.error);
  pthread_mutex_lock(&p.source->lock);
  CHECK(!p.source->paused && p.source->disk.held && !p.source->disk.tracking);
  pthread_mutex_unlock(&p.source->lock);
  pair_close(&p);
}

/* ---- post-copy ---------------------------------------------------------------------------- */

/* A link between the source and the destination: a TCP proxy that carries each connection
 * at about 8 MB/s, so that post-copy lasts long enough to be cut, and can cut every
 * connection it carries at once, as a failed link would. */
enum { kMaxLinks = 16 };

typedef struct net_link {
  pthread_mutex_t lock;
  int listen_fd;
  uint16_t target_port;
  char address[64];
  int stopping;
  pthread_t acceptor;
  int fds[2 * kMaxLinks]; /* both ends of every connection carried; closed by link_close */
  pthread_t carriers[kMaxLinks];
  int carried;
} net_link;

typedef struct carrier_args {
  int a, b;
} carrier_args;

static int forward(int from, int to, char* buffer, size_t size) {
  const ssize_t n = read(from, buffer, size);
  ssize_t at = 0;
  if (n <= 0) return -1;
  while (at < n) {
    const ssize_t w = send(to, buffer + at, (size_t)(n - at), MSG_NOSIGNAL);
    if (w <= 0) return -1;
    at += w;
  }
  return 0;
}

static void* carry(void* arg) {
  carrier_args c = *(carrier_args*)arg;
  char* buffer = malloc(64 << 10);
  free(arg);
  for (;;) {
    struct pollfd fds[2] = {{c.a, POLLIN, 0}, {c.b, POLLIN, 0}};
    if (poll(fds, 2, -1) < 0) break;
    if ((fds[0].revents && forward(c.a, c.b, buffer, 64 << 10) < 0) ||
        (fds[1].revents && forward(c.b, c.a, buffer, 64 << 10) < 0))
      break;
    sleep_us(8000);
  }
  shutdown(c.a, SHUT_RDWR);
  shutdown(c.b, SHUT_RDWR);
  free(buffer);
  return NULL;
}

static int connect_local(uint16_t port) {
  struct sockaddr_in to;
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  memset(&to, 0, sizeof to);
  to.sin_family = AF_INET;
  to.sin_port = htons(port);
  to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (fd >= 0 && connect(fd, (struct sockaddr*)&to, sizeof to) == 0) return fd;
  if (fd >= 0) close(fd);
  return -1;
}

static void* accept_links(void* arg) {
  net_link* l = arg;
  for (;;) {
    struct pollfd ready = {l->listen_fd, POLLIN, 0};
    int a, b;
    carrier_args* c;
    pthread_mutex_lock(&l->lock);
    if (l->stopping) break;
    pthread_mutex_unlock(&l->lock);
    if (poll(&ready, 1, 20) <= 0) continue;
    a = accept(l->listen_fd, NULL, NULL);
    b = a >= 0 ? connect_local(l->target_port) : -1;
    pthread_mutex_lock(&l->lock);
    if (b < 0 || l->carried == kMaxLinks) {
      if (a >= 0) close(a);
      if (b >= 0) close(b);
      pthread_mutex_unlock(&l->lock);
      continue;
    }
    c = malloc(sizeof *c);
    c->a = a;
    c->b = b;
    l->fds[2 * l->carried] = a;
    l->fds[2 * l->carried + 1] = b;
    pthread_create(&l->carriers[l->carried++], NULL, carry, c);
    pthread_mutex_unlock(&l->lock);
  }
  pthread_mutex_unlock(&l->lock);
  return NULL;
}

/* A link to the destination at `address` ("tcp:127.0.0.1:PORT"). */
static void link_open(net_link* l, const char* address) {
  struct sockaddr_in at;
  socklen_t size = sizeof at;
  unsigned port = 0;
  memset(l, 0, sizeof *l);
  pthread_mutex_init(&l->lock, NULL);
  CHECK(sscanf(address, "tcp:127.0.0.1:%u", &port) == 1);
  l->target_port = (uint16_t)port;
  l->listen_fd = socket(AF_INET, SOCK_STREAM, 0);
  memset(&at, 0, sizeof at);
  at.sin_family = AF_INET;
  at.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  CHECK(bind(l->listen_fd, (struct sockaddr*)&at, sizeof at) == 0 && listen(l->listen_fd, 16) == 0);
  CHECK(getsockname(l->listen_fd, (struct sockaddr*)&at, &size) == 0);
  snprintf(l->address, sizeof l->address, "tcp:127.0.0.1:%u", (unsigned)ntohs(at.sin_port));
  pthread_create(&l->acceptor, NULL, accept_links, l);
}

/* Every connection it carries breaks; later ones are carried again. */
static void link_cut(net_link* l) {
  int i;
  pthread_mutex_lock(&l->lock);
  for (i = 0; i < 2 * l->carried; ++i) shutdown(l->fds[i], SHUT_RDWR);
  pthread_mutex_unlock(&l->lock);
}

static void link_close(net_link* l) {
  int i;
  link_cut(l);
  pthread_mutex_lock(&l->lock);
  l->stopping = 1;
  pthread_mutex_unlock(&l->lock);
  pthread_join(l->acceptor, NULL);
  for (i = 0; i < l->carried; ++i) pthread_join(l->carriers[i], NULL);
  for (i = 0; i < 2 * l->carried; ++i) close(l->fds[i]);
  close(l->listen_fd);
  pthread_mutex_destroy(&l->lock);
}

/* Waits up to 30 s for the migration to reach `status`; whether it did. */
static int wait_for_status(mig_migration* migration, mig_status status) {
  mig_progress progress;
  int i;
  for (i = 0; i < 15000; ++i) {
    if (mig_migration_progress(migration, &progress) == MIG_OK && progress.status == status) return 1;
    sleep_us(2000);
  }
  return 0;
}

static void check_memory_moved(const pair* p) {
  size_t r;
  for (r = 0; p->d.vm && r < kRegions; ++r)
    CHECK(memcmp(p->source->regions[r].host, p->d.vm->regions[r].host, kRegionSize[r]) == 0);
}

/* The guest switches to post-copy after round 0 and runs at the destination, touching every
 * page, while the pages it dirtied during round 0 are still at the source. */
static void test_postcopy(void) {
  pair p;
  destination how;
  mig_send_options options;
  mig_outcome sent, received;

  memset(&how, 0, sizeof how);
  how.touch = 1;
  pair_open_to(&p, how, NULL);
  mig_send_options_init(&options);
  options.postcopy = 1;
  options.postcopy_after_ms = 0;
  pair_start(&p, &options);
  CHECK(mig_migration_wait(p.migration, 60000, &sent) == MIG_OK);
  CHECK(sent.status == MIG_STATUS_COMPLETED && sent.postcopy == 1 && sent.verified == 1);
  CHECK(mig_incoming_wait(p.incoming, 60000, &received) == MIG_OK);
  CHECK(received.status == MIG_STATUS_COMPLETED && received.postcopy == 1 && received.verified == 1);
  CHECK(p.source->paused && p.d.vm && p.d.vm->has_toucher && p.d.vm->writes == p.source->writes);
  check_memory_moved(&p);
  pair_close(&p);
}

/* The link breaks in post-copy. With a recovery address at the destination, the source
 * reconnects there and post-copy completes; without one, the destination gives the guest
 * up at once (MIG_ERR_GUEST_LOST), and the source waits, paused, until it is freed. */
static void test_postcopy_broken_link(int recoverable) {
  pair p;
  net_link l;
  destination how;
  mig_send_options options;
  mig_outcome sent, received;

  memset(&how, 0, sizeof how);
  how.touch = recoverable; /* a guest blocked on a page that never comes would never end */
  how.no_recovery = !recoverable;
  pair_open_to(&p, how, NULL);
  link_open(&l, mig_incoming_address(p.incoming));
  mig_send_options_init(&options);
  options.postcopy = 1;
  options.postcopy_after_ms = 0;
  CHECK(mig_migration_start(p.source_vm, l.address, &options, &p.migration) == MIG_OK);
  CHECK(wait_for_status(p.migration, MIG_STATUS_POSTCOPY_ACTIVE));
  link_cut(&l);
  CHECK(wait_for_status(p.migration, MIG_STATUS_POSTCOPY_PAUSED));
  CHECK(mig_migration_cancel(p.migration) == MIG_ERR_STATE);
  if (recoverable) {
    CHECK(mig_migration_recover_postcopy(p.migration, mig_incoming_recovery_address(p.incoming)) == MIG_OK);
    CHECK(mig_migration_wait(p.migration, 60000, &sent) == MIG_OK);
    CHECK(sent.status == MIG_STATUS_COMPLETED && sent.postcopy == 1 && sent.postcopy_recoveries == 1);
    CHECK(mig_incoming_wait(p.incoming, 60000, &received) == MIG_OK);
    CHECK(received.status == MIG_STATUS_COMPLETED && received.postcopy_recoveries == 1 && received.verified == 1);
    check_memory_moved(&p);
  } else {
    CHECK(strcmp(mig_incoming_recovery_address(p.incoming), "") == 0);
    CHECK(mig_incoming_wait(p.incoming, 60000, &received) == MIG_ERR_GUEST_LOST);
    CHECK(received.status == MIG_STATUS_FAILED && received.postcopy == 1 && strstr(received.error, "recovery") != NULL);
    CHECK(mig_migration_wait(p.migration, 0, NULL) == MIG_ERR_TIMEOUT);
    mig_migration_free(p.migration); /* gives the paused post-copy up */
    p.migration = NULL;
  }
  CHECK(p.source->paused);
  link_close(&l);
  pair_close(&p);
}

/* A destination whose memory is a shared file cannot take post-copy: the source, which asked
 * for it, fails at once and runs on. */
static void test_postcopy_refused_by_shared_memory(void) {
  pair p;
  destination how;
  mig_send_options options;
  mig_outcome sent;

  memset(&how, 0, sizeof how);
  how.in_memfds = 1;
  pair_open_to(&p, how, NULL);
  mig_send_options_init(&options);
  options.postcopy = 1;
  pair_start(&p, &options);
  CHECK(mig_migration_wait(p.migration, 60000, &sent) == MIG_ERR_FAILED);
  CHECK(strstr(sent.error, "post-copy") != NULL);
  if (!strstr(sent.error, "post-copy")) fprintf(stderr, "  the error was: %s\n", sent.error);
  pthread_mutex_lock(&p.source->lock);
  CHECK(!p.source->paused);
  pthread_mutex_unlock(&p.source->lock);
  pair_close(&p);
}

/* ---- same-host hand-over ----------------------------------------------------------------- */

/* A source whose memory is in memfds starts migrating over a unix socket to a destination
 * that maps that very memory, declines it (a copy), or builds its VM on memory of its own. */
enum handover { kHandOver, kDecline, kIgnore };

static void start_handover(pair* p, enum handover mode) {
  destination how;
  mig_send_options options;
  static char uri[64];
  mig_destination_check check;
  fake_vm* source = fake_vm_in_memfds(1);

  CHECK(mig_vm_set_memory_fds(NULL, source->memfds, kRegions) == MIG_ERR_INVALID);
  memset(&how, 0, sizeof how);
  snprintf(uri, sizeof uri, "unix:/tmp/mig-capi-test-%ld.sock", (long)getpid());
  how.uri = uri;
  how.decline_memory = mode == kDecline;
  how.ignore_memory = mode == kIgnore;
  pair_open_to(p, how, source);
  CHECK(mig_vm_set_memory_fds(p->source_vm, source->memfds, 1) == MIG_ERR_INVALID);
  CHECK(mig_vm_set_memory_fds(p->source_vm, source->memfds, kRegions) == MIG_OK);
  sleep_us(20000);
  mig_send_options_init(&options);
  /* Offered beside the memory, post-copy and verification apply if the destination copies. */
  options.postcopy = 1;
  /* The dry run says which it would be. */
  CHECK(mig_check_destination(p->source_vm, uri, &options, &check) == MIG_OK);
  CHECK(check.shared_memory == (mode != kDecline) && check.postcopy == (mode == kDecline));
  pair_start(p, &options);
}

/* Handed over, no page crosses the socket, and there is nothing to verify or to copy late;
 * declined, the memory is copied, verified, and can switch to post-copy. */
static void test_memory_handover(int decline) {
  pair p;
  mig_outcome sent, received;
  mig_result result;

  start_handover(&p, decline ? kDecline : kHandOver);
  /* Handed over, with no page to copy, the migration may be over before the request comes
   * (seen once under ctest -j2): there is nothing to switch either way. */
  result = mig_migration_start_postcopy(p.migration);
  CHECK(result == MIG_OK || (!decline && result == MIG_ERR_STATE));
  CHECK(mig_migration_wait(p.migration, 60000, &sent) == MIG_OK);
  CHECK(mig_incoming_wait(p.incoming, 60000, &received) == MIG_OK);
  CHECK(sent.shared_memory == !decline && received.shared_memory == !decline);
  CHECK(sent.verified == decline && received.verified == decline);
  CHECK(sent.postcopy == decline && received.postcopy == decline);
  CHECK(p.d.vm && p.d.vm->mapped == !decline && p.d.vm->writes == p.source->writes && p.source->writes > 0);
  check_memory_moved(&p);
  if (decline) {
    CHECK(sent.bytes > kRegionSize[0] + kRegionSize[1]);
  } else if (p.d.vm) {
    /* One copy of the guest's memory, mapped twice. */
    CHECK(sent.bytes < 64 * 1024);
    ((unsigned char*)p.d.vm->regions[1].host)[5] ^= 0xff;
    CHECK(memcmp(p.source->regions[1].host, p.d.vm->regions[1].host, 8) == 0);
  }
  pair_close(&p);
}

/* A destination VM that takes the memory but maps memory of its own would resume the guest
 * on zeros: it is refused before the commit, and the source runs on. */
static void test_handover_to_other_memory(void) {
  pair p;
  mig_outcome sent;

  start_handover(&p, kIgnore);
  CHECK(mig_migration_wait(p.migration, 60000, &sent) == MIG_ERR_FAILED);
  CHECK(strstr(sent.error, "does not map the source's memory") != NULL);
  pthread_mutex_lock(&p.source->lock);
  CHECK(!p.source->paused);
  pthread_mutex_unlock(&p.source->lock);
  pair_close(&p);
}

/* The pages of [host, host + size) the kernel counts as touched; -1 where mig_populated_pages
 * refuses. */
static long populated_count(void* host, uint64_t size, int fd) {
  uint64_t bitmap[64] = {0};
  long count = 0;
  size_t w;
  if (size / MIG_PAGE_SIZE > 64 * 64 || mig_populated_pages(host, size, fd, bitmap, 64) != MIG_OK) return -1;
  for (w = 0; w < 64; ++w) count += __builtin_popcountll(bitmap[w]);
  return count;
}

/* mig_populated_pages on each kind of memory it knows, and on memory it must refuse: a
 * private mapping of a file reads the file where untouched, and a mapping from another
 * offset does not line up with the file's data. */
static void test_populated_pages_of_memory(void) {
  enum { kPages = 512 };
  const uint64_t size = kPages * MIG_PAGE_SIZE;
  uint64_t bitmap[kPages / 64] = {0};
  unsigned char* anonymous = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  const int memfd = memfd_create("capi-populated", MFD_CLOEXEC);
  unsigned char *shared, *file_private, *shifted;
  if (anonymous == MAP_FAILED || memfd < 0 || ftruncate(memfd, (off_t)(2 * size)) != 0) abort();
  shared = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
  file_private = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, memfd, 0);
  shifted = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, MIG_PAGE_SIZE);
  if (shared == MAP_FAILED || file_private == MAP_FAILED || shifted == MAP_FAILED) abort();
  madvise(anonymous, size, MADV_NOHUGEPAGE); /* a huge page would make one write 512 pages */

  anonymous[3 * MIG_PAGE_SIZE] = 1;
  anonymous[300 * MIG_PAGE_SIZE + 17] = 1;
  CHECK(mig_populated_pages(anonymous, size, -1, bitmap, kPages / 64) == MIG_OK);
  CHECK(bitmap[0] == 1u << 3 && bitmap[300 / 64] == 1ull << (300 % 64) && populated_count(anonymous, size, -1) == 2);
  shared[5 * MIG_PAGE_SIZE] = 1;
  CHECK(populated_count(shared, size, memfd) == 1);
  /* A write through the fd, not the mapping, counts too (mincore sees the page cache). */
  CHECK(pwrite(memfd, "x", 1, 7 * MIG_PAGE_SIZE) == 1);
  CHECK(populated_count(shared, size, memfd) == 2);

  CHECK(mig_populated_pages(shared, size, -1, bitmap, kPages / 64) == MIG_ERR_INVALID);
  CHECK(strstr(mig_last_error(), "not private anonymous memory") != NULL);
  CHECK(mig_populated_pages(file_private, size, -1, bitmap, kPages / 64) == MIG_ERR_INVALID);
  CHECK(mig_populated_pages(file_private, size, memfd, bitmap, kPages / 64) == MIG_ERR_INVALID);
  CHECK(strstr(mig_last_error(), "MAP_SHARED from its offset 0") != NULL);
  CHECK(mig_populated_pages(shifted, size, memfd, bitmap, kPages / 64) == MIG_ERR_INVALID);
  CHECK(mig_populated_pages(anonymous, size, memfd, bitmap, kPages / 64) == MIG_ERR_INVALID);
  CHECK(mig_populated_pages(anonymous, size, -1, bitmap, kPages / 64 - 1) == MIG_ERR_INVALID);
  CHECK(mig_populated_pages(anonymous + 1, MIG_PAGE_SIZE, -1, bitmap, 1) == MIG_ERR_INVALID);
  CHECK(mig_populated_pages(anonymous, size, -1, NULL, kPages / 64) == MIG_ERR_INVALID);
  munmap(anonymous, size);
  CHECK(mig_populated_pages(anonymous, size, -1, bitmap, kPages / 64) == MIG_ERR_INVALID);
  CHECK(strstr(mig_last_error(), "not mapped") != NULL);
  munmap(shared, size);
  munmap(file_private, size);
  munmap(shifted, size);
  close(memfd);
}

static int fake_populated_pages(void* opaque, size_t region, uint64_t* bitmap, size_t words) {
  fake_vm* vm = opaque;
  ++vm->populated_calls;
  return mig_populated_pages(vm->regions[region].host, vm->regions[region].size, -1, bitmap, words) == MIG_OK ? 0 : -EINVAL;
}

/* A guest that touched a few pages of its memory: with the callback, round 0 reads those and
 * no other page of the source (each would be faulted in, as the zero page); without it, it
 * reads them all. Either way the destination ends with the same memory. */
static void test_never_touched_pages(int with_callback) {
  static const uint64_t touched[] = {0, 1, 77, 500, 1023};
  pair p;
  mig_send_options options;
  mig_outcome sent, received;
  size_t r, i;
  const long pages = (long)(pages_of(0) + pages_of(1));

  pair_open_to(&p, (destination){0}, fake_vm_new(0));
  for (r = 0; r < kRegions; ++r) {
    madvise(p.source->regions[r].host, kRegionSize[r], MADV_NOHUGEPAGE);
    madvise(p.source->regions[r].host, kRegionSize[r], MADV_DONTNEED); /* as never touched */
  }
  for (i = 0; i < sizeof touched / sizeof touched[0]; ++i)
    ((unsigned char*)p.source->regions[i % kRegions].host)[touched[i] * MIG_PAGE_SIZE + 8] = (unsigned char)(i + 1);
  CHECK(mig_vm_set_populated_pages(NULL, fake_populated_pages) == MIG_ERR_INVALID);
  if (with_callback) CHECK(mig_vm_set_populated_pages(p.source_vm, fake_populated_pages) == MIG_OK);
  mig_send_options_init(&options);
  pair_start(&p, &options);
  CHECK(mig_migration_wait(p.migration, 60000, &sent) == MIG_OK);
  CHECK(mig_incoming_wait(p.incoming, 60000, &received) == MIG_OK);
  CHECK(sent.verified == 1 && received.verified == 1);
  CHECK(p.source->populated_calls == (with_callback ? kRegions : 0));
  {
    long read = 0; /* counted before the comparison below reads every page */
    for (r = 0; r < kRegions; ++r) read += populated_count(p.source->regions[r].host, kRegionSize[r], -1);
    if (with_callback) CHECK(read == (long)(sizeof touched / sizeof touched[0]));
    else CHECK(read == pages);
  }
  check_memory_moved(&p);
  pair_close(&p);
}

/* A guest that writes pages after logging starts and before round 0 reads them, and then no
 * more. Re-armed late, those pages leave once, in round 0, with what was written, and round 1
 * finds nothing; re-armed at the fetch, round 0's fetch reports them and they go again. */
static void test_late_rearm_sends_once(int late_rearm) {
  enum { kWrittenAtStart = 64 };
  pair p;
  mig_send_options options;
  mig_outcome sent, received;
  mig_progress progress;
  fake_vm* source = fake_vm_new(0);
  const uint64_t expected_pages = pages_of(0) + pages_of(1) + (late_rearm ? 0 : kWrittenAtStart);
  size_t r;

  for (r = 0; r < kRegions; ++r) memset(source->regions[r].host, 0x5a, kRegionSize[r]); /* no zero page */
  source->paused = 0;
  source->writes_at_start = kWrittenAtStart;
  pair_open_to(&p, (destination){0}, source);
  if (late_rearm)
    CHECK(mig_vm_set_late_rearm(p.source_vm, fake_fetch_dirty_log_unarmed, fake_rearm_dirty_pages) == MIG_OK);
  mig_send_options_init(&options);
  options.channels = 2;
  pair_start(&p, &options);
  CHECK(mig_migration_wait(p.migration, 60000, &sent) == MIG_OK);
  CHECK(mig_incoming_wait(p.incoming, 60000, &received) == MIG_OK);
  CHECK(sent.verified == 1 && received.verified == 1);
  CHECK(mig_migration_progress(p.migration, &progress) == MIG_OK);
  CHECK(progress.pages_sent == expected_pages);
  if (progress.pages_sent != expected_pages)
    fprintf(stderr, "  %llu pages sent, %llu expected\n", (unsigned long long)progress.pages_sent,
            (unsigned long long)expected_pages);
  check_rearmed_late(p.source, late_rearm);
  check_memory_moved(&p);
  pair_close(&p);
}

/* The pre-flight check: what the destination would take, or why not. It builds nothing, and
 * the real migration follows. */
static void test_check_destination(void) {
  pair p;
  mig_send_options options;
  mig_recv_options no_postcopy;
  mig_incoming* refusing = NULL;
  mig_destination_check check;
  mig_outcome sent, received;

  pair_open(&p, 0);
  mig_send_options_init(&options);
  options.channels = 4;
  options.postcopy = 1;
  CHECK(mig_check_destination(p.source_vm, mig_incoming_address(p.incoming), &options, &check) == MIG_OK);
  CHECK(check.channels == 4 && check.postcopy == 1 && check.shared_memory == 0);
  CHECK(p.d.vm == NULL);
  mig_recv_options_init(&no_postcopy);
  no_postcopy.postcopy = 0;
  CHECK(mig_incoming_listen("tcp:127.0.0.1:0", &no_postcopy, make_destination_vm, &p.d, &refusing) == MIG_OK);
  CHECK(mig_check_destination(p.source_vm, mig_incoming_address(refusing), &options, &check) == MIG_ERR_FAILED);
  CHECK(strstr(mig_last_error(), "the destination cannot take post-copy: this receiver takes no post-copy") != NULL);
  mig_incoming_free(refusing);
  CHECK(mig_check_destination(p.source_vm, "tcp:127.0.0.1:1", &options, &check) == MIG_ERR_CONNECT);
  CHECK(mig_check_destination(NULL, mig_incoming_address(p.incoming), &options, &check) == MIG_ERR_INVALID);
  options.channels = 0;
  CHECK(mig_check_destination(p.source_vm, mig_incoming_address(p.incoming), &options, &check) == MIG_ERR_INVALID);
  options.channels = 4;
  pair_start(&p, &options);
  CHECK(mig_migration_wait(p.migration, 60000, &sent) == MIG_OK);
  CHECK(mig_incoming_wait(p.incoming, 60000, &received) == MIG_OK);
  CHECK(sent.verified == 1 && received.verified == 1);
  check_memory_moved(&p);
  pair_close(&p);
}

typedef enum source_failure { kDestinationRefuses, kSaveStateFails, kRearmFails } source_failure;

/* Failures on either side leave the source running, each with a message that says why. */
static void test_failures_resume_the_source(source_failure failure, const char* expected) {
  pair p;
  mig_send_options options;
  mig_outcome outcome;

  pair_open(&p, failure == kDestinationRefuses);
  p.source->fail_save_state = failure == kSaveStateFails;
  p.source->fail_rearm = failure == kRearmFails;
  if (failure == kRearmFails)
    CHECK(mig_vm_set_late_rearm(p.source_vm, fake_fetch_dirty_log_unarmed, fake_rearm_dirty_pages) == MIG_OK);
  mig_send_options_init(&options);
  pair_start(&p, &options);
  CHECK(mig_migration_wait(p.migration, 60000, &outcome) == MIG_ERR_FAILED);
  CHECK(strstr(outcome.error, expected) != NULL);
  CHECK(strstr(mig_last_error(), expected) != NULL);
  if (!strstr(outcome.error, expected)) fprintf(stderr, "  the error was: %s\n", outcome.error);
  pthread_mutex_lock(&p.source->lock);
  CHECK(!p.source->paused && !p.source->logging);
  pthread_mutex_unlock(&p.source->lock);
  pair_close(&p);
}

static void test_bad_arguments(void) {
  fake_vm* source = fake_vm_new(0);
  mig_vm* source_vm = describe(source);
  mig_vm* none = NULL;
  mig_vm_ops missing = fake_ops;
  mig_send_options options;
  mig_migration* migration = NULL;

  CHECK(strcmp(mig_version(), MIG_VERSION_STRING) == 0);
  CHECK(mig_api_version() == MIG_API_VERSION);
  CHECK(strcmp(mig_status_name(MIG_STATUS_POSTCOPY_ACTIVE), "postcopy-active") == 0);
  CHECK(strcmp(mig_result_name(MIG_ERR_HANDOFF_UNKNOWN), "handoff-unknown") == 0);
  CHECK(strcmp(mig_result_name(MIG_ERR_GUEST_LOST), "guest-lost") == 0);

  CHECK(mig_vm_set_late_rearm(source_vm, fake_fetch_dirty_log_unarmed, NULL) == MIG_ERR_INVALID);
  CHECK(strstr(mig_last_error(), "both callbacks or neither") != NULL);
  CHECK(mig_vm_set_late_rearm(source_vm, NULL, fake_rearm_dirty_pages) == MIG_ERR_INVALID);
  CHECK(mig_vm_set_late_rearm(NULL, fake_fetch_dirty_log_unarmed, fake_rearm_dirty_pages) == MIG_ERR_INVALID);
  CHECK(mig_vm_set_late_rearm(source_vm, NULL, NULL) == MIG_OK);

  missing.pause = NULL;
  CHECK(mig_vm_new(&missing, source, 1, source->regions, kRegions, &none) == MIG_ERR_INVALID && none == NULL);
  CHECK(strstr(mig_last_error(), "callback") != NULL);
  CHECK(mig_vm_new(&fake_ops, source, 0, source->regions, kRegions, &none) == MIG_ERR_INVALID);

  mig_send_options_init(&options);
  CHECK(mig_migration_start(source_vm, "tcp:nowhere", &options, &migration) == MIG_ERR_INVALID && !migration);
  CHECK(strstr(mig_last_error(), "tcp:") != NULL);
  CHECK(mig_migration_start(source_vm, "tcp:127.0.0.1:1", &options, &migration) == MIG_ERR_CONNECT && !migration);
  CHECK(mig_last_error()[0] != '\0');
  options.tls_creds_dir = "/nonexistent";
  CHECK(mig_migration_start(source_vm, "tcp:127.0.0.1:1", &options, &migration) == MIG_ERR_INVALID);
  CHECK(strstr(mig_last_error(), "/nonexistent") != NULL);
  mig_send_options_init(&options);
  options.downtime_ms = 0;
  CHECK(mig_migration_start(source_vm, "tcp:127.0.0.1:1", &options, &migration) == MIG_ERR_INVALID);
  mig_send_options_init(&options);
  options.policy = "zen";
  CHECK(mig_migration_start(source_vm, "tcp:127.0.0.1:1", &options, &migration) == MIG_ERR_INVALID);
  CHECK(strstr(mig_last_error(), "no policy 'zen'") != NULL);
  CHECK(mig_vm_add_disk(source_vm, &disk_ops, source, NULL) == MIG_ERR_INVALID);
  {
    mig_disk_ops no_read = disk_ops, release_alone = disk_ops;
    mig_disk_info info = {kDiskBytes, kChunkBytes, NULL};
    no_read.read = NULL;
    release_alone.reacquire = NULL;
    CHECK(mig_vm_add_disk(source_vm, &no_read, source, &info) == MIG_ERR_INVALID);
    CHECK(strstr(mig_last_error(), "required") != NULL);
    CHECK(mig_vm_add_disk(source_vm, &release_alone, source, &info) == MIG_ERR_INVALID);
    info.chunk_bytes = 3 * 4096;
    CHECK(mig_vm_add_disk(source_vm, &disk_ops, source, &info) == MIG_ERR_INVALID);
    CHECK(strstr(mig_last_error(), "power of two") != NULL);
    info.chunk_bytes = kChunkBytes;
    info.size = kDiskBytes + 100;
    CHECK(mig_vm_add_disk(source_vm, &disk_ops, source, &info) == MIG_ERR_INVALID);
  }

  mig_send_options_init(&options);
  options.channels = 17;
  CHECK(mig_migration_start(source_vm, "tcp:127.0.0.1:1", &options, &migration) == MIG_ERR_INVALID);
  CHECK(strstr(mig_last_error(), "channels") != NULL);
  CHECK(mig_migration_start(NULL, "tcp:127.0.0.1:1", &options, &migration) == MIG_ERR_INVALID);

  mig_migration_free(NULL);
  mig_incoming_free(NULL);
  mig_vm_free(source_vm);
  fake_vm_free(source);
}

int main(void) {
  test_bad_arguments();
  test_live_migration(1, NULL, 0);
  test_live_migration(4, "xen", 0);
  test_live_migration(2, NULL, 1);
  test_cancel();
  test_dirty_limit(0);
  test_dirty_limit(1);
  test_failures_resume_the_source(kDestinationRefuses, "refused the guest");
  test_failures_resume_the_source(kSaveStateFails, "save_state failed: Input/output error");
  test_failures_resume_the_source(kRearmFails, "rearm_dirty_pages failed: Input/output error");
  test_storage(1);
  test_storage(0);
  test_storage_refused(1, 1, 0, "the source has 1 disks, the VM here 0");
  test_storage_refused(0, 0, 1, "disk callback reacquire (fake.img) failed: Device or resource busy");
  test_postcopy();
  test_postcopy_broken_link(1);
  test_postcopy_broken_link(0);
  test_postcopy_refused_by_shared_memory();
  test_memory_handover(0);
  test_memory_handover(1);
  test_handover_to_other_memory();
  test_check_destination();
  test_populated_pages_of_memory();
  test_never_touched_pages(1);
  test_never_touched_pages(0);
  test_late_rearm_sends_once(1);
  test_late_rearm_sends_once(0);
  if (failures) fprintf(stderr, "%d checks failed\n", failures);
  else printf("capi_test: every check passed\n");
  return failures ? 1 : 0;
}
