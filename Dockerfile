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
# pip's index and TLS trust, for builds behind a private index or an intercepting proxy,
# without either landing in a layer or in the build's history: secret mounts (BuildKit,
# buildah), present only while this RUN runs and only when given to the build:
#   --secret id=pip.conf,src=FILE  a pip config: index-url (credentials may be in it),
#                                  extra-index-url, trusted-host, ...
#   --secret id=pip-ca,src=FILE    a PEM bundle pip trusts instead of its own
# An index URL without credentials may instead be a build argument (--build-arg
# PIP_INDEX_URL=...), which pip reads from the environment; an unset or empty one is
# ignored. The proxy itself comes through Docker's predefined HTTPS_PROXY argument.
# The secrets' uid is the builder's, which pip runs as.
ARG PIP_INDEX_URL
# tomli is bundled into the zipapp for node Pythons without tomllib (3.9, 3.10).
RUN --mount=type=secret,id=pip.conf,uid=10001 \
    --mount=type=secret,id=pip-ca,uid=10001 \
    if [ -f /run/secrets/pip.conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip.conf; fi \
    && if [ -f /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
    && /opt/nodeplug/bin/pip install --constraint .ci/constraints.txt . tomli
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
# Owned by root: the builder's uid does not exist in this image, and nothing here but
# root may change what root runs.
COPY --from=builder --chown=0:0 /opt/nodeplug /opt/nodeplug
COPY --from=builder --chown=0:0 /opt/nodeplug-share/nodeplug-credential-provider \
    /usr/local/share/nodeplug/nodeplug-credential-provider
ENV PATH=/opt/nodeplug/bin:$PATH
# Root, on purpose: the daemon mounts and bind-mounts volumes, attaches loop devices,
# runs btrfs ioctls and opens device nodes; the init container writes root's host
# directories. The DaemonSet grants each container only what it needs on top of this
# (privileged for the daemon alone; the sidecars are other images).
USER 0:0
ENTRYPOINT ["nodeplug", "run", "--config", "/etc/nodeplug/config.yaml"]
