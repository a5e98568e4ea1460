/*
 * noop.c - a no-op milter on the reference libmilter (Debian libmilter-dev), for the
 * benchmark (bench/milter.sh, case "noop-c"): every stage is asked for and answered
 * with continue, nothing is changed. libmilter runs one thread per connection, as it
 * does for clamav-milter and OpenDKIM. Beside testdata/milter/noop.py (pymilter, every
 * callback under Python's GIL) it shows what the protocol costs without the cost of
 * an interpreter.
 *
 * Build: gcc -O2 -o noop-c noop.c -lmilter -lpthread
 * Usage: noop-c PORT          (listens on inet:PORT@127.0.0.1)
 *        noop-c unix:/PATH    (listens on a Unix socket)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libmilter/mfapi.h>

static sfsistat on_connect(SMFICTX *ctx, char *host, _SOCK_ADDR *addr)
{
	(void) ctx; (void) host; (void) addr;
	return SMFIS_CONTINUE;
}

static sfsistat on_helo(SMFICTX *ctx, char *name)
{
	(void) ctx; (void) name;
	return SMFIS_CONTINUE;
}

static sfsistat on_argv(SMFICTX *ctx, char **argv)
{
	(void) ctx; (void) argv;
	return SMFIS_CONTINUE;
}

static sfsistat on_header(SMFICTX *ctx, char *name, char *value)
{
	(void) ctx; (void) name; (void) value;
	return SMFIS_CONTINUE;
}

static sfsistat on_stage(SMFICTX *ctx)
{
	(void) ctx;
	return SMFIS_CONTINUE;
}

static sfsistat on_body(SMFICTX *ctx, unsigned char *chunk, size_t len)
{
	(void) ctx; (void) chunk; (void) len;
	return SMFIS_CONTINUE;
}

static sfsistat on_unknown(SMFICTX *ctx, const char *cmd)
{
	(void) ctx; (void) cmd;
	return SMFIS_CONTINUE;
}

static struct smfiDesc desc = {
	"noop-c",	/* name */
	SMFI_VERSION,	/* libmilter version */
	0,		/* actions: none */
	on_connect,
	on_helo,
	on_argv,	/* envfrom */
	on_argv,	/* envrcpt */
	on_header,
	on_stage,	/* eoh */
	on_body,
	on_stage,	/* eom */
	on_stage,	/* abort */
	on_stage,	/* close */
	on_unknown,
	on_stage,	/* data */
	NULL,		/* negotiate: libmilter asks for every stage with a callback */
};

int main(int argc, char **argv)
{
	char conn[64];

	if (argc != 2 || (strncmp(argv[1], "unix:", 5) != 0 && atoi(argv[1]) <= 0)) {
		fprintf(stderr, "usage: %s PORT | unix:/PATH\n", argv[0]);
		return 2;
	}
	if (strncmp(argv[1], "unix:", 5) == 0)
		snprintf(conn, sizeof conn, "%s", argv[1]);
	else
		snprintf(conn, sizeof conn, "inet:%s@127.0.0.1", argv[1]);
	if (smfi_setconn(conn) == MI_FAILURE || smfi_register(desc) == MI_FAILURE) {
		fprintf(stderr, "noop-c: cannot set up %s\n", conn);
		return 1;
	}
	/* Backlog for 50 sessions opening at once (the default is 5 before 8.13). */
	smfi_setbacklog(128);
	return smfi_main() == MI_SUCCESS ? 0 : 1;
}
