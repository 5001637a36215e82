# Image for GPU clusters (built and run where a Docker engine and NVIDIA GPUs exist; not built in CI).
#   docker build -t encoder-pretrain .
#   docker run --gpus all --ipc=host -v $PWD/runs:/workspace/runs encoder-pretrain \
#     deepspeed --num_gpus 8 --module trainer.pretrain --config configs/pretrain/roberta_base.yaml data.prefix=...
# The base image ships a CUDA build of PyTorch, nvcc and NCCL; pip keeps that torch (setup.py only asks torch>=2.4).
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    # Prebuild DeepSpeed's CUDA ops at install time instead of JIT-compiling them on every new node:
    # fused Adam (the optimizer the trainer selects on GPUs) and the CPU Adam used by ZeRO-Offload.
    DS_BUILD_FUSED_ADAM=1 \
    DS_BUILD_CPU_ADAM=1 \
    # Compile for the GPUs clusters run today: A100 (8.0), A10/L4/L40 (8.6, 8.9), H100/H200 (9.0).
    TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"

RUN apt-get update \
 && apt-get install -y --no-install-recommends git openssh-client pdsh libaio-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace
# Dependencies first so that code edits do not rebuild DeepSpeed's ops.
COPY setup.py README.md ./
RUN mkdir trainer models data tools \
 && touch trainer/__init__.py models/__init__.py data/__init__.py tools/__init__.py \
 && pip install --no-cache-dir ".[test,zh]" \
 && pip uninstall -y encoder-pretrain \
 && python -c "import deepspeed, megatron.core, tokenizers, sentencepiece; print('deepspeed', deepspeed.__version__)" \
 && ds_report

COPY . .
RUN pip install --no-cache-dir --no-deps -e .

# The deepspeed launcher reaches other nodes over ssh (pdsh); schedulers that start one launcher per
# node use `deepspeed --no_ssh --node_rank N ...` instead (see docs/pretraining.md, "Several nodes").
CMD ["bash"]
