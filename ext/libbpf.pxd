# Only the libbpf calls netmon uses (libbpf >= 1.0: errors come back as NULL/-errno).
from libc.stdint cimport uint32_t, uint64_t


cdef extern from "<bpf/libbpf.h>" nogil:
    struct bpf_object:
        pass
    struct bpf_program:
        pass
    struct bpf_map:
        pass
    struct bpf_link:
        pass
    struct ring_buffer:
        pass
    ctypedef int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size) noexcept nogil
    struct ring_buffer_opts:
        pass
    # the DNS ring's consumer (the events ring's lives in ext/consumer.c)
    ring_buffer *ring_buffer__new(int map_fd, ring_buffer_sample_fn sample_cb, void *ctx,
                                  const ring_buffer_opts *opts)
    int ring_buffer__consume(ring_buffer *rb)
    void ring_buffer__free(ring_buffer *rb)

    # what a generated skeleton (bpftool gen skeleton) hands libbpf: one entry a program,
    # pointing at the skeleton's program and link slots
    struct bpf_prog_skeleton:
        bpf_program **prog
        bpf_link **link
    struct bpf_object_skeleton:
        int prog_cnt
        bpf_prog_skeleton *progs

    const char *libbpf_version_string()
    int libbpf_num_possible_cpus()

    const char *bpf_program__name(const bpf_program *prog)
    int bpf_program__fd(const bpf_program *prog)
    int bpf_program__type(const bpf_program *prog)
    bpf_link *bpf_program__attach(const bpf_program *prog)
    bpf_link *bpf_program__attach_cgroup(const bpf_program *prog, int cgroup_fd)
    int bpf_program__set_autoload(bpf_program *prog, bint autoload)
    int bpf_program__set_type(bpf_program *prog, int type)
    int bpf_program__set_expected_attach_type(bpf_program *prog, int type)
    int bpf_link__destroy(bpf_link *link)

    int bpf_map__fd(const bpf_map *map)
    int bpf_map__set_max_entries(bpf_map *map, uint32_t max_entries)


cdef extern from "<bpf/bpf.h>" nogil:
    int bpf_map_lookup_elem(int fd, const void *key, void *value)
    int bpf_map_update_elem(int fd, const void *key, const void *value, uint64_t flags)
    int bpf_obj_get_info_by_fd(int bpf_fd, void *info, uint32_t *info_len)


cdef extern from "<linux/bpf.h>" nogil:
    enum:
        BPF_PROG_TYPE_CGROUP_SOCK_ADDR
        BPF_PROG_TYPE_CGROUP_SKB
    struct bpf_prog_info:
        uint32_t id
        uint64_t run_time_ns
        uint64_t run_cnt
