# The lowering service on CPU: FastAPI + AOTInductor jobs, each in a fresh bubblewrap sandbox.
#   docker build -t lowering-service .
#   docker run -p 8000:8000 -v lowering-data:/data \
#     --security-opt seccomp=unconfined --security-opt apparmor=unconfined lowering-service
FROM python:3.11-slim

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

# torch first and on its own layer: it is ~200 MB and changes far less often than the app.
# The CPU index keeps the CUDA wheels (several GB) out of the image.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
# numpy is the rest of the [worker] extra (torch warns without it), pinned to the version
# the test suite runs with; torch itself is already satisfied by the CPU build above.
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
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('LOWERING_PORT', '8000') + '/healthz', timeout=4)"]

CMD ["lowering-service"]
