"""Build: compile bpf/netmon.bpf.c with clang, generate its skeleton header with bpftool
(it embeds the object), cythonize ext/_core.pyx and link it against the system libbpf."""
import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
VERSION = re.search(r'__version__ = "([^"]+)"',
                    open(os.path.join(HERE, "netmon", "_version.py")).read()).group(1)
GEN = os.path.join("build", "gen")


def _tool(name, hint):
    path = shutil.which(name)
    if not path:
        sys.exit(f"netmon build: '{name}' not found; install it: {hint}")
    return path


def build_bpf_skeleton():
    """bpf/netmon.bpf.c -> build/gen/netmon.skel.h: the object, embedded, and typed
    accessors for its maps, programs, links and config (bpftool gen skeleton)."""
    os.makedirs(GEN, exist_ok=True)
    obj = os.path.join(GEN, "netmon.bpf.o")
    clang = _tool(os.environ.get("CLANG", "clang"), "apt-get install clang llvm")
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    cmd = [clang, "-g", "-O2", "-Wall", "-target", "bpf", "-Ibpf",
           f"-I/usr/include/{multiarch}", "-c", "bpf/netmon.bpf.c", "-o", obj]
    print(" ".join(cmd))
    subprocess.run(cmd, check=True)
    strip = shutil.which("llvm-strip")
    if strip:  # drop DWARF, keep .BTF/.BTF.ext for CO-RE
        subprocess.run([strip, "-g", obj], check=True)
    bpftool = _tool("bpftool", "apt-get install bpftool")
    header = subprocess.run([bpftool, "gen", "skeleton", obj, "name", "netmon_bpf"],
                            check=True, stdout=subprocess.PIPE, text=True).stdout
    path = os.path.join(GEN, "netmon.skel.h")
    if not os.path.exists(path) or open(path).read() != header:  # unchanged: no rebuild
        with open(path, "w") as f:
            f.write(header)


class BuildExt(build_ext):
    def run(self):
        build_bpf_skeleton()
        super().run()


def extensions():
    from Cython.Build import cythonize

    ext = Extension(
        "netmon._core",
        sources=["ext/_core.pyx", "ext/store.c", "ext/rollup.c", "ext/consumer.c"],
        include_dirs=["ext", "bpf", GEN],
        libraries=["bpf"],
        define_macros=[("NETMON_VERSION", f'"{VERSION}"')],
        extra_compile_args=["-O2", "-Wno-unused-function"],
        depends=["ext/store.h", "ext/rollup.h", "ext/hash.h", "ext/consumer.h",
                 "ext/libbpf.pxd", "ext/netmon.pxd",
                 "bpf/netmon.h", "bpf/netmon.bpf.c", "bpf/kernel.h"],
    )
    return cythonize([ext], include_path=["ext"], language_level=3,
                     compiler_directives={"embedsignature": True})


setup(version=VERSION, ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
