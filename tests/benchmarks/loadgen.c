// SPDX-License-Identifier: MIT
/* netmon benchmark load: a tight loop of connect() calls on loopback, or of a syscall
 * that never connects, timed from inside so process start-up is not counted.
 *
 *   loadgen [-n CALLS] [-t] [-6] [-p] [-s] [-u] [-T] [-r PER_SECOND]
 *     default  CALLS x { socket(SOCK_DGRAM); connect(127.0.0.1:9); close }  (no packet sent)
 *     -t       TCP to a listener of our own: { socket; connect; accept; close both, RST }
 *     -6       ::1 instead of 127.0.0.1
 *     -p       CALLS x getppid(): what a connect monitor costs unrelated syscalls
 *     -s       CALLS x sendto(127.0.0.1:9) of 1 byte on ONE unconnected UDP socket (never
 *              connects: only sendmsg hooks see it); `failed` counts sendto() errors
 *     -u       CALLS x { send 64 bytes; receive them } on a connected UDP pair: one packet
 *              a socket receives per call (what an ingress program costs)
 *     -T       the same with 512 bytes on a connected TCP pair (TCP_NODELAY): one segment
 *     -r N     pace to about N calls per second (default: flat out)
 *
 * Prints one JSON object: calls, failed, secs, rate, and the loop's user/sys CPU seconds. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double mono(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double cpu(int sys)
{
	struct rusage ru;
	struct timeval *tv = sys ? &ru.ru_stime : &ru.ru_utime;

	getrusage(RUSAGE_SELF, &ru);
	return tv->tv_sec + tv->tv_usec * 1e-6;
}

static void fail(const char *what)
{
	perror(what);
	exit(1);
}

/* a connected pair of `type` sockets on 127.0.0.1: fds[0] sends, fds[1] receives */
static void loopback_pair(int type, int fds[2])
{
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t len = sizeof(a);
	int one = 1, l = socket(AF_INET, type, 0);

	if (l < 0 || bind(l, (struct sockaddr *)&a, len) || getsockname(l, (struct sockaddr *)&a, &len))
		fail("bind");
	fds[0] = socket(AF_INET, type, 0);
	if (type == SOCK_STREAM && listen(l, 1))
		fail("listen");
	if (connect(fds[0], (struct sockaddr *)&a, len))
		fail("connect");
	if (type == SOCK_STREAM) {
		fds[1] = accept(l, NULL, NULL);
		close(l);
		setsockopt(fds[0], IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	} else {
		struct sockaddr_in me;
		socklen_t mlen = sizeof(me);

		getsockname(fds[0], (struct sockaddr *)&me, &mlen);
		if (connect(l, (struct sockaddr *)&me, mlen))
			fail("connect");
		fds[1] = l;
	}
	if (fds[0] < 0 || fds[1] < 0)
		fail("pair");
}

/* sleep until call i is due when pacing at `rate` calls per second from t0 */
static void pace(long i, double rate, double t0)
{
	double ahead = t0 + i / rate - mono();

	if (ahead > 0) {
		struct timespec d = {(time_t)ahead, (long)((ahead - (time_t)ahead) * 1e9)};

		nanosleep(&d, NULL);
	}
}

int main(int argc, char **argv)
{
	long calls = 200000, failed = 0;
	int tcp = 0, v6 = 0, noconnect = 0, sendto_ = 0, opt, lfd = -1, ufd = -1, rx = 0;
	int pair[2];
	char buf[512] = {0};
	double rate = 0;
	struct sockaddr_storage dst = {0};
	socklen_t dlen;
	struct linger rst = {.l_onoff = 1, .l_linger = 0};

	while ((opt = getopt(argc, argv, "n:t6psuTr:")) != -1) {
		switch (opt) {
		case 'n': calls = atol(optarg); break;
		case 't': tcp = 1; break;
		case '6': v6 = 1; break;
		case 'p': noconnect = 1; break;
		case 's': sendto_ = 1; break;
		case 'u': rx = SOCK_DGRAM; break;
		case 'T': rx = SOCK_STREAM; break;
		case 'r': rate = atof(optarg); break;
		default:
			fprintf(stderr, "usage: %s [-n CALLS] [-t] [-6] [-p] [-s] [-r PER_SECOND]\n", argv[0]);
			return 2;
		}
	}
	if (v6) {
		struct sockaddr_in6 *a = (struct sockaddr_in6 *)&dst;

		a->sin6_family = AF_INET6;
		a->sin6_addr = in6addr_loopback;
		a->sin6_port = htons(9);
		dlen = sizeof(*a);
	} else {
		struct sockaddr_in *a = (struct sockaddr_in *)&dst;

		a->sin_family = AF_INET;
		a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		a->sin_port = htons(9);
		dlen = sizeof(*a);
	}
	if (tcp) { /* listen on an ephemeral port of the same loopback address */
		struct sockaddr_storage any = dst;

		((struct sockaddr_in *)&any)->sin_port = 0; /* same offset in sockaddr_in6 */
		if ((lfd = socket(dst.ss_family, SOCK_STREAM, 0)) < 0)
			fail("socket");
		if (bind(lfd, (struct sockaddr *)&any, dlen) || listen(lfd, 4096))
			fail("bind/listen");
		if (getsockname(lfd, (struct sockaddr *)&dst, &dlen))
			fail("getsockname");
	}
	if (sendto_ && (ufd = socket(dst.ss_family, SOCK_DGRAM, 0)) < 0)
		fail("socket");
	if (rx)
		loopback_pair(rx, pair);

	double u0 = cpu(0), s0 = cpu(1), t0 = mono();

	for (long i = 0; i < calls; i++) {
		if (rate > 0 && (i & 63) == 0)
			pace(i, rate, t0);
		if (noconnect) {
			syscall(SYS_getppid);
			continue;
		}
		if (rx) {
			size_t n = rx == SOCK_DGRAM ? 64 : 512;

			if (send(pair[0], buf, n, 0) != (ssize_t)n ||
			    recv(pair[1], buf, n, MSG_WAITALL) != (ssize_t)n)
				failed++;
			continue;
		}
		if (sendto_) {
			if (sendto(ufd, "x", 1, 0, (struct sockaddr *)&dst, dlen) != 1)
				failed++;
			continue;
		}
		int fd = socket(dst.ss_family, tcp ? SOCK_STREAM : SOCK_DGRAM, 0);

		if (fd < 0)
			fail("socket");
		if (connect(fd, (struct sockaddr *)&dst, dlen) < 0) {
			failed++;
		} else if (tcp) {
			int afd = accept(lfd, NULL, NULL);

			if (afd < 0)
				fail("accept");
			setsockopt(fd, SOL_SOCKET, SO_LINGER, &rst, sizeof(rst)); /* no TIME_WAIT */
			close(afd);
		}
		close(fd);
	}
	double secs = mono() - t0;

	printf("{\"calls\": %ld, \"failed\": %ld, \"secs\": %.6f, \"rate\": %.1f, "
	       "\"user_s\": %.6f, \"sys_s\": %.6f}\n",
	       calls, failed, secs, calls / secs, cpu(0) - u0, cpu(1) - s0);
	return failed ? 1 : 0;
}
