/* The hash the store's tables share (store.c's joins and top-N groups, rollup.c). */
#ifndef NETMON_HASH_H
#define NETMON_HASH_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* the one hash mixer: a Fibonacci multiply with its high half folded down, so the top
 * bits and the low bits alike depend on every bit a caller's keys vary in */
static inline uint64_t mix(uint64_t x)
{
	x *= 0x9E3779B97F4A7C15ull;
	return x ^ x >> 32;
}

/* a key's hash, a word at a time; never 0 (an empty slot, for tables that say so) */
static inline uint64_t key_hash(const uint8_t *p, size_t n)
{
	uint64_t h = n, w;

	for (; n >= 8; p += 8, n -= 8) {
		memcpy(&w, p, 8);
		h = mix(h ^ w);
	}
	if (n) {
		w = 0;
		memcpy(&w, p, n);
		h = mix(h ^ w);
	}
	return h | 1;
}

#endif
