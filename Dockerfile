# The lowering service: FastAPI + AOTInductor jobs, each in a fresh bubblewrap sandbox. The same
# image runs the API (the default command), a fleet's worker host (`lowering-service worker
# --name cpu`) and the one-shot `lowering-service migrate`; see docker-compose.yml.
#   docker build -t lowering-service .                                   (CPU torch)
#   docker build --build-arg TORCH_INDEX=cu130 -t lowering-service:cuda .  (a GPU worker host)
#   docker run -p 8000:8000 -v lowering-data:/data -e LOWERING_AUTH=off \
#     --security-opt seccomp=unconfined --security-opt apparmor=unconfined lowering-service
# (it binds 0.0.0.0: it refuses to start until LOWERING_AUTH says required (keys) or off)
FROM python:3.11-slim

# Which PyTorch wheel index torch comes from: cpu keeps the CUDA wheels (several GB) out of
# the image; a GPU worker host's image names a CUDA one (cu126, cu128, cu130: whichever the
# pinned torch is built for and the host's driver supports).
ARG TORCH_INDEX=cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# g++ is needed at run time, not just build time: AOTInductor compiles the C++ it
# generates for every lowering job inside the job sandbox. bubblewrap is that sandbox
# (LOWERING_SANDBOX=required refuses jobs without it) and libseccomp2 compiles its
# seccomp filter. The container needs user namespaces: see docker-compose.yml.
# DL3008 (pin apt versions) is ignored: g++ is Debian's default-compiler metapackage, and
# a pinned version disappears from the archive whenever the base image moves to a new
# Debian point release, breaking the build; each job records the compiler it used.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ bubblewrap libseccomp2 \
    && rm -rf /var/lib/apt/lists/*

# torch first and on its own layer: it is ~200 MB (CPU) and changes far less often than the app.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/${TORCH_INDEX} \
    torch==${TORCH_VERSION}

WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
# numpy is the rest of the [worker] extra (torch warns without it), pinned to the version
# the test suite runs with; torch itself is already satisfied by the build above.
RUN pip install --no-cache-dir numpy==2.4.6 .

# A fixed uid so a bind-mounted /data can be chowned to match on the host.
RUN useradd --create-home --uid 10001 --user-group lowering \
    && mkdir -p /data \
    && chown lowering:lowering /data
VOLUME /data
ENV LOWERING_DATA_DIR=/data \
    LOWERING_HOST=0.0.0.0 \
    LOWERING_PORT=8000

# The lowering user, by number: Kubernetes' runAsNonRoot can only verify a numeric uid.
USER 10001:10001
WORKDIR /home/lowering
EXPOSE 8000

# slim has no curl; python's urllib raises (exit 1) on a refused connection or non-2xx.
# A worker host serves no HTTP: docker-compose.yml gives it its own check (a broker ping).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('LOWERING_PORT', '8000') + '/healthz', timeout=4)"]

CMD ["lowering-service"]
