/*
 * hello: prints "hello from bake" and exits. The entrypoint of recipes/hello-static.yaml.
 *
 * A `scratch` image has no libc, no loader and no shell, so this program uses none: it is a
 * static x86_64 ELF that talks to the kernel with two raw system calls (write, exit). Build it
 * with `make` (see Makefile); the built binary is committed as rootfs/hello so that the recipe
 * builds without a compiler. Rebuilding with the same gcc gives the same bytes.
 */

#define SYS_write 1
#define SYS_exit 60

static const char message[] = "hello from bake\n";

static long syscall3(long number, long a, long b, long c)
{
	long ret;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(number), "D"(a), "S"(b), "d"(c)
			 : "rcx", "r11", "memory");
	return ret;
}

/* The kernel enters here with a 16-byte aligned stack and no return address. */
__attribute__((noreturn, force_align_arg_pointer)) void _start(void)
{
	long len = (long)sizeof message - 1;
	long written = syscall3(SYS_write, 1, (long)message, len);
	syscall3(SYS_exit, written == len ? 0 : 1, 0, 0);
	__builtin_unreachable();
}
