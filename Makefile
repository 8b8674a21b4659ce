# The targets the README names. `make demo` and `make test` work on a fresh
# Debian machine: they install what they need (see .ci/deps).

CARGO ?= cargo
KILN  := target/release/kiln

.PHONY: all build demo test lint bench bench-baseline bench-before14 fuzz deps clean man image

all: build

build:
	$(CARGO) build --release --locked

## kiln's own image (recipes/kiln/kiln.toml): the release binary without its
## debug info, on Debian's libc and busybox, as an OCI layout and a docker-archive.
image: build
	mkdir -p target/image out
	objcopy --strip-debug $(KILN) target/image/kiln
	$(KILN) build recipes/kiln/kiln.toml --context . -o oci:out/kiln-image -o docker-archive:out/kiln-image.tar

## Man pages (kiln.1 and one per command) into target/man: `man -l target/man/kiln-build.1`.
man: build
	$(KILN) man --dir target/man

## System tools the tests and the demo use (Debian packages, dockerd); idempotent.
deps:
	.ci/deps

## Build the example recipes (stages and run steps in kiln's own sandbox; Debian
## packages from a lockfile; a bootable VM disk), show them, and run them.
demo: build deps
	cp /bin/busybox recipes/examples/hello/busybox
	cp /bin/busybox recipes/examples/busybox/busybox
	$(KILN) build recipes/examples/busybox/kiln.toml -o oci:out/busybox-run -o docker-archive:out/busybox-run.tar
	$(KILN) inspect oci:out/busybox-run
	@if docker info >/dev/null 2>&1; then \
		docker load -i out/busybox-run.tar && docker run --rm busybox-run:latest; \
	else echo "(no Docker engine answers: run 'make deps' to start one, then 'docker load -i out/busybox-run.tar')"; fi
	@# A registry on loopback: push the image and its step cache; then a fresh cache (another
	@# CI runner) builds the same digest from the registry alone, running nothing.
	@if [ -f out/registry/pid ]; then kill `cat out/registry/pid` 2>/dev/null || true; fi  # one a failed demo left
	@rm -rf out/registry out/fresh-cache && mkdir -p out/registry && printf 'version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s/out/registry/data\nhttp:\n  addr: 127.0.0.1:5055\n' "$(CURDIR)" > out/registry/config.yml
	@docker-registry serve out/registry/config.yml >out/registry/log 2>&1 & echo $$! > out/registry/pid; sleep 1
	$(KILN) build recipes/examples/busybox/kiln.toml -o registry:127.0.0.1:5055/kiln/busybox-run:demo --cache-to registry:127.0.0.1:5055/kiln/cache
	$(KILN) build recipes/examples/busybox/kiln.toml --cache-dir out/fresh-cache --cache-from registry:127.0.0.1:5055/kiln/cache -o oci:out/busybox-run-fresh
	skopeo inspect --tls-verify=false docker://127.0.0.1:5055/kiln/busybox-run:demo | grep -E '"(Name|Digest)"'
	@kill `cat out/registry/pid`
	@# Debian packages from the committed kiln.lock (downloaded from a Debian mirror once, then cached).
	$(KILN) build recipes/examples/python/kiln.toml -o oci:out/python -o docker-archive:out/python.tar
	$(KILN) sbom oci:out/python > out/python.spdx.json
	@python3 -c 'import json; d = json.load(open("out/python.spdx.json")); print("SBOM (out/python.spdx.json):", ", ".join(p["name"] + " " + p["versionInfo"] for p in d["packages"]))'
	@if docker info >/dev/null 2>&1; then \
		docker load -i out/python.tar && docker run --rm kiln-example-python:latest; \
	else echo "(no Docker engine answers: 'docker load -i out/python.tar' later)"; fi
	@# A real Debian install: nginx, its maintainer scripts run in kiln's sandbox, security updates included.
	$(KILN) build recipes/examples/nginx/kiln.toml -o oci:out/nginx -o docker-archive:out/nginx.tar
	@if docker info >/dev/null 2>&1; then \
		docker load -q -i out/nginx.tar && \
		docker run -d --rm --name kiln-demo-nginx -p 127.0.0.1:8089:80 kiln-example-nginx:latest >/dev/null && \
		for i in 1 2 3 4 5 6 7 8 9 10; do curl -sf http://127.0.0.1:8089/ >/dev/null && break; sleep 0.5; done; \
		echo "nginx answers on http://127.0.0.1:8089/: $$(curl -s http://127.0.0.1:8089/ | grep -o '<title>.*</title>')"; \
		docker rm -f kiln-demo-nginx >/dev/null; \
	else echo "(no Docker engine answers: 'docker load -i out/nginx.tar' later)"; fi
	@# The same kind of recipe as a VM disk: Debian's kernel, kiln's initramfs, syslinux; booted under qemu.
	$(KILN) build recipes/examples/vm-hello/kiln.toml -o vm:out/vm-hello.qcow2
	timeout 300 qemu-system-x86_64 -m 512 -nographic -no-reboot -accel tcg \
		-drive file=out/vm-hello.qcow2,if=virtio,snapshot=on | grep -a -E "KILN-VM-HELLO|Power down"

## Unit and integration tests (the integration tests drive the real binary).
test:
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --workspace --locked --no-fail-fast; \
	else $(CARGO) test --workspace --locked --no-fail-fast; fi

## The fuzz targets (recipe parser, layer reader and unpacker, the binary on
## fuzzed recipes) far longer than CI runs them (256 cases each there).
fuzz:
	KILN_FUZZ_CASES=$${KILN_FUZZ_CASES:-20000} $(CARGO) nextest run --workspace --locked -E 'binary(/fuzz/) | test(/fuzz/)'

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

## Benchmarks; results go to bench/RESULTS.md.
bench: build deps bench-baseline bench-before14
	python3 bench/bench.py

clean:
	$(CARGO) clean
	rm -rf out bench/work

# An older commit's release build, made once: $(1) the commit, $(2) the
# folder under target/ (its sources in target/$(2)-src).
define build_rev
	@if [ ! -x target/$(2)/release/kiln ]; then \
		rm -rf target/$(2)-src && mkdir -p target/$(2)-src && \
		git archive $(1) | tar -x -C target/$(2)-src && \
		CARGO_TARGET_DIR=$(CURDIR)/target/$(2) $(CARGO) build --release --locked \
			--manifest-path target/$(2)-src/Cargo.toml; \
	fi
endef

## The code before issue 13 (run steps unconfined): W2 measures what
## confinement costs against it, in the same run.
BASELINE_REV ?= fcd90fd
bench-baseline:
	$(call build_rev,$(BASELINE_REV),baseline)

## The code before issue 14 (the engine split into crates): W1-W5 run with
## it and with this checkout, alternating, in the same run.
BEFORE14_REV ?= c963289
bench-before14:
	$(call build_rev,$(BEFORE14_REV),before14)
