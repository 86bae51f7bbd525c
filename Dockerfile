# nodeplug's image: the daemon (`nodeplug run`), and the credential provider zipapp that
# the DaemonSet's init container copies onto each node (manifests/daemonset.yaml).
#
#   docker build -t REGISTRY/nodeplug:0.1.0 .
#
# Both stages start from the same image, so the virtualenv built in the first one finds
# its interpreter at the same path in the second. Debian 12 (bookworm) is what CI tests
# the daemon on, with the same btrfs-progs and util-linux. Pin a digest as well once you
# have resolved one (`docker buildx imagetools inspect`), for builds that repeat exactly.
ARG PYTHON_IMAGE=python:3.11.17-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
# Nothing in this stage needs root once the virtualenv's directory exists.
RUN useradd --create-home --uid 10001 builder \
    && install -d -o builder /opt/nodeplug /opt/nodeplug-share
USER builder
WORKDIR /home/builder/src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/nodeplug
# The same pins as CI (.ci/constraints.txt), so the image runs what the tests ran.
COPY --chown=builder .ci/constraints.txt .ci/constraints.txt
COPY --chown=builder pyproject.toml README.md ./
COPY --chown=builder daemon daemon
COPY --chown=builder deviceplugin deviceplugin
COPY --chown=builder csi csi
COPY --chown=builder credprovider credprovider
# tomli is bundled into the zipapp for node Pythons without tomllib (3.9, 3.10).
RUN /opt/nodeplug/bin/pip install --constraint .ci/constraints.txt . tomli
# Built from the installed package (not this source tree), outside it.
RUN cd / && /opt/nodeplug/bin/python -m credprovider.build \
    --output /opt/nodeplug-share/nodeplug-credential-provider

FROM ${PYTHON_IMAGE}
# What the daemon runs: mount, umount and losetup (mount), findmnt and the rest of
# util-linux, mkfs.btrfs and btrfs (btrfs-progs), chattr +C for block-volume files
# (e2fsprogs), and libudev for pyudev (the udev backend loads it at run time).
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        btrfs-progs \
        e2fsprogs \
        libudev1 \
        mount \
        util-linux \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/nodeplug /opt/nodeplug
COPY --from=builder /opt/nodeplug-share/nodeplug-credential-provider \
    /usr/local/share/nodeplug/nodeplug-credential-provider
ENV PATH=/opt/nodeplug/bin:$PATH
# Root, on purpose: the daemon mounts and bind-mounts volumes, attaches loop devices,
# runs btrfs ioctls and opens device nodes; the init container writes root's host
# directories. The DaemonSet grants each container only what it needs on top of this
# (privileged for the daemon alone; the sidecars are other images).
USER 0:0
ENTRYPOINT ["nodeplug", "run", "--config", "/etc/nodeplug/config.yaml"]
