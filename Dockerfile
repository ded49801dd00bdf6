# genserve, CPU image: the Serve application and a baked model store on Ray 2.60.0, the Ray that the project's
# venv runs (rayVersion in deploy/k8s/base/rayservice.yaml and Dockerfile.gpu must say the same).
#   docker build -t genserve:0.1.0 .
#   docker run --rm -p 8000:8000 -p 9000:9000 --shm-size=2g genserve:0.1.0   (genserve up on the baked store)
# On KubeRay the pods set GENSERVE_STORE to the cluster's s3:// store instead (docs/kubernetes.md).
FROM rayproject/ray:2.60.0-py311-cpu

# wget: KubeRay's probes run it against the raylet, the GCS and Serve's /-/healthz; procps: pgrep, for the
# worker pods' preStop hook. Distribution package versions are not pinned: the base image's Ubuntu archive
# decides them, and a pin would break the build as soon as the archive moves on.
USER 0
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget procps \
    && rm -rf /var/lib/apt/lists/*

# The image's non-root user ray (uid 1000, group users = 100); the pods' securityContext runs as the same.
USER 1000:100
WORKDIR /home/ray/genserve
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GENSERVE_STORE=/home/ray/genserve/model_store_data

# As scripts/setup.sh does: torch 2.13.0 first, the CPU build (PyTorch's CPU index; an unpinned torch would pull
# a multi-GB CUDA build), then genserve itself, editable, so deploy/serve_config.yaml and checkpoints/ stay
# where the code looks for them. s3fs: the fsspec backend of s3:// model stores (its version follows fsspec's).
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY --chown=1000:100 . .
# Then the store, baked in: the committed checkpoints exported to ONNX, parity-checked and published into
# $GENSERVE_STORE. Its latency profiles are measured on the build machine; the policy corrects them online,
# and `genserve build --store s3://...` run on a serving node gives exact ones.
RUN pip install --no-cache-dir -e . s3fs==2026.9.0 \
    && genserve build --store "$GENSERVE_STORE"

EXPOSE 8000 9000 8080 8265 6379 10001
# Alone: `genserve up` adapts the cluster-sized config to this one container and serves the baked store.
# On KubeRay this command is replaced by KubeRay's `ray start`, and serveConfigV2 deploys the application.
CMD ["genserve", "up", "--no-build", "--host", "0.0.0.0"]
