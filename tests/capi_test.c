/* The C API from C: migrations between two in-process fake VMs, whose "guest" is a thread
 * writing pages while it is not paused. Compiled as C99 with -pedantic, so the header is
 * checked to be C too. Each check prints what failed; the exit status is the verdict. */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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

typedef struct fake_vm {
  pthread_mutex_t lock;
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
      ++vm->writes;
    }
    pause_us = vm->dirty_limit > 0 ? (long)(MIG_PAGE_SIZE * 1e6 / vm->dirty_limit) : 20;
    pthread_mutex_unlock(&vm->lock);
  }
  pthread_mutex_unlock(&vm->lock);
  return NULL;
}

/* Sets one of the VM's flags as the guest sees it: between two of its writes. */
static int set_locked(fake_vm* vm, int* flag, int value) {
  pthread_mutex_lock(&vm->lock);
  *flag = value;
  pthread_mutex_unlock(&vm->lock);
  return 0;
}

static int fake_start_dirty_log(void* opaque) { return set_locked(opaque, &((fake_vm*)opaque)->logging, 1); }

static int fake_stop_dirty_log(void* opaque) { return set_locked(opaque, &((fake_vm*)opaque)->logging, 0); }

static int fake_fetch_dirty_log(void* opaque, size_t region, uint64_t* bitmap, size_t words) {
  fake_vm* vm = opaque;
  size_t w;
  if (region >= kRegions || words != (pages_of(region) + 63) / 64) return -EINVAL;
  pthread_mutex_lock(&vm->lock);
  for (w = 0; w < words; ++w) {
    bitmap[w] = vm->written[region][w];
    vm->written[region][w] = 0;
  }
  pthread_mutex_unlock(&vm->lock);
  return 0;
}

static int fake_pause(void* opaque) { return set_locked(opaque, &((fake_vm*)opaque)->paused, 1); }

static int fake_resume(void* opaque) {
  fake_vm* vm = opaque;
  pthread_mutex_lock(&vm->lock);
  vm->paused = 0;
  ++vm->resumes;
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

static const mig_vm_ops fake_ops = {fake_start_dirty_log, fake_stop_dirty_log, fake_fetch_dirty_log, fake_pause,
                                    fake_resume,          fake_save_state,     fake_restore_state,   NULL};

/* Memory of the test's shape: a source's holds data (no zero pages to skip), and its guest
 * starts writing at once; a destination's is zero-filled. */
static fake_vm* fake_vm_new(int with_writer) {
  size_t r;
  fake_vm* vm = calloc(1, sizeof *vm);
  pthread_mutex_init(&vm->lock, NULL);
  for (r = 0; r < kRegions; ++r) {
    void* host = NULL;
    if (posix_memalign(&host, MIG_PAGE_SIZE, kRegionSize[r]) != 0) abort();
    memset(host, with_writer ? 0x5a : 0, kRegionSize[r]);
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

static void fake_vm_free(fake_vm* vm) {
  size_t r;
  if (!vm) return;
  if (vm->has_writer) {
    pthread_mutex_lock(&vm->lock);
    vm->stopping = 1;
    pthread_mutex_unlock(&vm->lock);
    pthread_join(vm->writer, NULL);
  }
  for (r = 0; r < kRegions; ++r) {
    free(vm->regions[r].host);
    free(vm->written[r]);
  }
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
} destination;

static mig_vm* make_destination_vm(void* opaque, const mig_vm_shape* shape) {
  destination* d = opaque;
  size_t r;
  if (d->refuse || shape->vcpus != 1 || shape->region_count != kRegions) return NULL;
  for (r = 0; r < kRegions; ++r)
    if (shape->regions[r].guest_addr != kRegionAddr[r] || shape->regions[r].size != kRegionSize[r]) return NULL;
  d->vm = fake_vm_new(0);
  return describe(d->vm);
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
  CHECK(mig_incoming_listen("tcp:127.0.0.1:0", &options, make_destination_vm, d, &incoming) == MIG_OK);
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

static void pair_open(pair* p, int refuse) {
  p->source = fake_vm_new(1);
  p->source_vm = describe(p->source);
  p->d.vm = NULL;
  p->d.refuse = refuse;
  p->incoming = listen_for(&p->d);
  p->migration = NULL;
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

static void test_live_migration(unsigned channels, const char* policy) {
  pair p;
  events seen = {PTHREAD_MUTEX_INITIALIZER, 0, 0, 0};
  mig_send_options options;
  mig_outcome sent, received;
  mig_progress progress;
  size_t r;

  pair_open(&p, 0);
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

/* Failures on either side leave the source running, each with a message that says why. */
static void test_failures_resume_the_source(int refuse, int fail_save_state, const char* expected) {
  pair p;
  mig_send_options options;
  mig_outcome outcome;

  pair_open(&p, refuse);
  p.source->fail_save_state = fail_save_state;
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
  test_live_migration(1, NULL);
  test_live_migration(4, "xen");
  test_cancel();
  test_dirty_limit(0);
  test_dirty_limit(1);
  test_failures_resume_the_source(1, 0, "refused the guest");
  test_failures_resume_the_source(0, 1, "save_state failed: Input/output error");
  if (failures) fprintf(stderr, "%d checks failed\n", failures);
  else printf("capi_test: every check passed\n");
  return failures ? 1 : 0;
}
