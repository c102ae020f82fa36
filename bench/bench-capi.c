/* The C API's round 0 with and without the populated-pages callback: a source whose guest
 * wrote every Nth page of its memory migrates to a receiver in the same process over loopback
 * TCP, each way in turn. Prints one line per migration: total time, downtime, bytes sent.
 *
 *   bench-capi [GIB (2)] [EVERY_NTH_PAGE (16)] [REPEATS (3)]
 *
 * The VM is memory and no-op callbacks: nothing dirties it, so the time is round 0's. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

#include "mig/mig.h"

static uint64_t guest_bytes;

typedef struct memory_vm {
  unsigned char* memory;
} memory_vm;

static int no_op(void* opaque) { return opaque ? 0 : -EINVAL; }

static int nothing_dirty(void* opaque, size_t region, uint64_t* bitmap, size_t words) {
  (void)region, (void)bitmap, (void)words;
  return opaque ? 0 : -EINVAL;
}

static int save_nothing(void* opaque, mig_state_writer* out) {
  (void)opaque;
  return mig_state_add(out, "bench.none", 1, "", 1) == MIG_OK ? 0 : -ENOMEM;
}

static int restore_nothing(void* opaque, const mig_state_section* sections, size_t count) {
  (void)opaque, (void)sections;
  return count == 1 ? 0 : -EPROTO;
}

static const mig_vm_ops ops = {no_op, no_op, nothing_dirty, no_op, no_op, save_nothing, restore_nothing, NULL};

static int populated_pages(void* opaque, size_t region, uint64_t* bitmap, size_t words) {
  const memory_vm* vm = opaque;
  (void)region;
  return mig_populated_pages(vm->memory, guest_bytes, -1, bitmap, words) == MIG_OK ? 0 : -EINVAL;
}

static unsigned char* fresh_memory(void) {
  unsigned char* memory = mmap(NULL, guest_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (memory == MAP_FAILED) {
    perror("bench-capi: mmap");
    exit(1);
  }
  return memory;
}

static mig_vm* describe(memory_vm* vm) {
  const mig_memory_region region = {0, guest_bytes, vm->memory};
  mig_vm* described = NULL;
  return mig_vm_new(&ops, vm, 1, &region, 1, &described) == MIG_OK ? described : NULL;
}

static memory_vm destination;

static mig_vm* make_destination(void* opaque, const mig_vm_shape* shape) {
  (void)opaque, (void)shape;
  destination.memory = fresh_memory();
  return describe(&destination);
}

static int fail(const char* what) {
  fprintf(stderr, "bench-capi: %s: %s\n", what, mig_last_error());
  return 1;
}

/* One migration of a guest that wrote every `nth` page; 0 when it completed. */
static int migrate_once(unsigned nth, int with_callback) {
  memory_vm source = {fresh_memory()};
  mig_vm* vm;
  mig_incoming* incoming = NULL;
  mig_migration* migration = NULL;
  mig_recv_options receiving;
  mig_send_options sending;
  mig_outcome sent, received;
  uint64_t page;

  for (page = 0; page < guest_bytes / MIG_PAGE_SIZE; page += nth) source.memory[page * MIG_PAGE_SIZE] = 1;
  if (!(vm = describe(&source))) return fail("mig_vm_new");
  if (with_callback && mig_vm_set_populated_pages(vm, populated_pages) != MIG_OK) return fail("mig_vm_set_populated_pages");
  mig_recv_options_init(&receiving);
  if (mig_incoming_listen("tcp:127.0.0.1:0", &receiving, make_destination, NULL, &incoming) != MIG_OK) return fail("listen");
  mig_send_options_init(&sending);
  if (mig_migration_start(vm, mig_incoming_address(incoming), &sending, &migration) != MIG_OK) return fail("start");
  if (mig_migration_wait(migration, 600000, &sent) != MIG_OK) return fail("the migration");
  if (mig_incoming_wait(incoming, 600000, &received) != MIG_OK) return fail("the receiver");
  printf("%.1f GiB, 1 page in %u written, populated-pages callback %-3s: total %6.0f ms, downtime %4.1f ms, "
         "%llu MB sent, %u rounds, verified %d\n",
         (double)guest_bytes / (1u << 30), nth, with_callback ? "on" : "off", sent.total_ms, sent.downtime_ms,
         (unsigned long long)(sent.bytes / 1000000), sent.rounds, sent.verified);
  fflush(stdout);
  mig_migration_free(migration);
  mig_incoming_free(incoming);
  mig_vm_free(vm);
  munmap(source.memory, guest_bytes);
  munmap(destination.memory, guest_bytes);
  return 0;
}

int main(int argc, char** argv) {
  const double gib = argc > 1 ? atof(argv[1]) : 2;
  const long nth = argc > 2 ? atol(argv[2]) : 16;
  const long repeats = argc > 3 ? atol(argv[3]) : 3;
  long i;
  if (gib <= 0 || gib > 64 || nth < 1 || repeats < 1) {
    fprintf(stderr, "usage: bench-capi [GIB (0-64)] [EVERY_NTH_PAGE (>= 1)] [REPEATS (>= 1)]\n");
    return 2;
  }
  guest_bytes = (uint64_t)(gib * (1u << 30)) / MIG_PAGE_SIZE * MIG_PAGE_SIZE;
  for (i = 0; i < repeats; ++i)
    if (migrate_once((unsigned)nth, 0) || migrate_once((unsigned)nth, 1)) return 1;
  return 0;
}
