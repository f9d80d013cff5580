# The pipeline's image: Python 3.11, torch from PyTorch's CPU index, the pinned set of requirements.lock,
# then this package (not editable) with its workflow; the entry point is the `bids-deepstudy` command.
# Build from the repository root (.dockerignore lets only the files copied below in):
#   docker build -t ghcr.io/bids-deepstudy/bids-deepstudy:0.1.0 .
# CUDA: the same recipe with torch's CUDA build. Its wheels carry the CUDA libraries, so the base stays
# python:3.11-slim and the host needs only the NVIDIA driver (docker run --gpus all; apptainer --nv):
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t ghcr.io/bids-deepstudy/bids-deepstudy:0.1.0-cuda .
# Apptainer.def is the same recipe for `apptainer build`. tests/test_environments.py checks both against
# the lock, pyproject.toml and the Makefile; no image has been built from them yet (README, Containers).
FROM python:3.11-slim
LABEL org.opencontainers.image.title="bids-deepstudy" org.opencontainers.image.licenses="MIT"

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /opt/bids-deepstudy
COPY requirements.lock ./
RUN pip install torch==2.13.0 --index-url "$TORCH_INDEX" \
 && pip install -r requirements.lock
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
COPY workflow ./workflow
RUN pip install --no-deps . \
 && bids-deepstudy --version

WORKDIR /work
ENTRYPOINT ["bids-deepstudy"]
CMD ["--help"]
