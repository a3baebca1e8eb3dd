"""Bad fleets, as data: the files, then every error line `fleetctl validate` must print for them."""

from __future__ import annotations

from dataclasses import dataclass, field

BASE = """\
models:
  chat:
    source: hf://org/chat
"""

GPU3 = """\
inventory:
  gpus:
    - {index: 0, memory: 24GiB}
    - {index: 1, memory: 24GiB}
    - {index: 2, memory: 24GiB}
"""


@dataclass(frozen=True)
class Case:
    id: str
    files: dict[str, str | bytes]
    errors: list[str]
    model_dirs: dict[str, dict[str, str]] = field(default_factory=dict)  # local model folders to create


CASES = [
    Case("yaml-syntax", {"fleet.yaml": "models:\n  chat:\n    source: [hf://org/chat\n"},
         ["fleet.yaml:4:1: YAML syntax error: expected ',' or ']', but got '<stream end>'"]),
    Case("tab-indent", {"fleet.yaml": "models:\n\tchat: {}\n"},
         ["fleet.yaml:2:1: YAML syntax error: found character '\\t' that cannot start any token"]),
    Case("duplicate-key-in-file", {"fleet.yaml": "models:\n  chat:\n    source: hf://a/b\n    source: hf://a/c\n"},
         ["fleet.yaml:4:5: duplicate key 'source' in one mapping; keep one"]),
    Case("empty-file", {"fleet.yaml": ""},
         ["fleet.yaml:1:1: file is empty; a fleet file is a mapping such as `models: {...}` — add content or "
          "delete the file"]),
    Case("empty-extra-file", {"fleet.yaml": BASE, "fleet.d/10-more.yaml": "# nothing yet\n"},
         ["fleet.d/10-more.yaml:1:1: file is empty; a fleet file is a mapping such as `models: {...}` — add "
          "content or delete the file"]),
    Case("top-level-list", {"fleet.yaml": "- chat\n- embed\n"},
         ["fleet.yaml:1:1: the top level must be a mapping (keys such as models:, defaults:), not a list"]),
    Case("top-level-string", {"fleet.yaml": "just some text\n"},
         ["fleet.yaml:1:1: the top level must be a mapping (keys such as models:, defaults:), not a string"]),
    Case("huge-file", {"fleet.yaml": b"# " + b"x" * (5 * 1024 * 1024) + b"\n"},
         ["fleet.yaml:1:1: file is 5.2 MB; fleet files are limited to 1024 KiB — is this the right file?"]),
    Case("unknown-top-key", {"fleet.yaml": BASE + "colour: blue\n"},
         ["fleet.yaml:4:1: colour: unknown key 'colour'; allowed here: daemon, defaults, inventory, models, openai, "
          "ray, settings, swap_groups"]),
    Case("typo-model-key", {"fleet.yaml": "models:\n  chat:\n    source: hf://org/chat\n    gpu_memroy: 0.5\n"},
         ["fleet.yaml:4:5: models.chat.gpu_memroy: unknown key 'gpu_memroy'; did you mean 'gpu_memory'?"]),
    Case("typo-top-key", {"fleet.yaml": "model:\n  chat:\n    source: hf://org/chat\n"},
         ["fleet.yaml:1:1: model: unknown key 'model'; did you mean 'models'?"]),
    Case("typo-defaults-key", {"fleet.yaml": BASE + "defaults:\n  idle_timout: 5m\n"},
         ["fleet.yaml:5:3: defaults.idle_timout: unknown key 'idle_timout'; did you mean 'idle_timeout'?"]),
    Case("wrong-type-replicas", {"fleet.yaml": BASE + "    replicas: two\n"},
         ["fleet.yaml:4:15: models.chat.replicas: Input should be a valid integer, unable to parse string as an "
          "integer (got 'two')"]),
    Case("wrong-type-gpus", {"fleet.yaml": BASE + "    gpus: 0\n"},
         ["fleet.yaml:4:11: models.chat.gpus: Input should be a valid list (got 0)"]),
    Case("missing-source", {"fleet.yaml": "models:\n  chat:\n    task: generate\n"},
         ["fleet.yaml:2:3: models.chat.source: is required; add source: to models.chat"]),
    Case("bad-task", {"fleet.yaml": BASE + "    task: chat\n"},
         ["fleet.yaml:4:11: models.chat.task: Input should be 'generate' or 'embed' (got 'chat')"]),
    Case("duplicate-model-across-files",
         {"fleet.yaml": BASE, "fleet.d/20-chat.yaml": "models:\n  chat:\n    source: hf://org/other\n"},
         ["fleet.d/20-chat.yaml:2:3: models.chat: model 'chat' is defined twice: here and at fleet.yaml:2:3; "
          "keep one definition"]),
    Case("duplicate-setting-across-files",
         {"fleet.yaml": BASE + "openai:\n  port: 8000\n", "fleet.d/a.yaml": "openai:\n  port: 9000\n"},
         ["fleet.d/a.yaml:2:3: openai.port: 'openai.port' is defined twice: here and at fleet.yaml:5:3; "
          "keep one definition"]),
    Case("bad-duration", {"fleet.yaml": BASE + "    idle_timeout: 15 minutes\n"},
         ["fleet.yaml:4:19: models.chat.idle_timeout: '15 minutes' is not a duration; write e.g. 90s, 15m, 1h30m, "
          "or never"]),
    Case("negative-duration", {"fleet.yaml": BASE + "defaults:\n  idle_timeout: -5\n"},
         ["fleet.yaml:5:17: defaults.idle_timeout: a duration cannot be negative"]),
    Case("bad-unload-after", {"fleet.yaml": BASE + "    unload_after: soon\n"},
         ["fleet.yaml:4:19: models.chat.unload_after: 'soon' is not a duration; write e.g. 90s, 15m, 1h30m, "
          "or never"]),
    Case("sleep-not-a-bool", {"fleet.yaml": BASE + "defaults:\n  sleep: sometimes\n"},
         ["fleet.yaml:5:10: defaults.sleep: Input should be a valid boolean, unable to interpret input "
          "(got 'sometimes')"]),
    Case("sleep-mode-engine-arg", {"fleet.yaml": BASE + "    engine: {enable_sleep_mode: true}\n"},
         ["fleet.yaml:4:13: models.chat.engine: engine arg 'enable_sleep_mode' is set by the fleet; use sleep: "
          "(GPU models get sleep mode unless sleep: false) instead"]),
    Case("bad-source-scheme", {"fleet.yaml": "models:\n  chat:\n    source: s3://bucket/model\n"},
         ["fleet.yaml:3:13: models.chat.source: unsupported source scheme 's3'; use hf://org/name[@revision], "
          "pkg://package/path, or a local path (/abs or ./relative)"]),
    Case("ambiguous-source", {"fleet.yaml": "models:\n  chat:\n    source: Qwen/Qwen2.5-7B\n"},
         ["fleet.yaml:3:13: models.chat.source: 'Qwen/Qwen2.5-7B' is ambiguous; write hf://Qwen/Qwen2.5-7B for "
          "the Hugging Face Hub or ./Qwen/Qwen2.5-7B for a local folder"]),
    Case("inline-api-key", {"fleet.yaml": BASE + "openai:\n  api_keys: [sk-live-0123456789abcdef]\n"},
         ["fleet.yaml:5:14: openai.api_keys[0]: this looks like an inline secret (24 characters); put the key in an "
          "environment variable and name the variable here, e.g. api_keys: [FLEET_API_KEY]"]),
    Case("inline-hf-token-env", {"fleet.yaml": BASE + "    env:\n      HF_TOKEN: hf_abcdefabcdef\n"},
         ["fleet.yaml:5:7: models.chat.env: HF_TOKEN holds an inline secret; write HF_TOKEN: \"${HF_TOKEN}\" to "
          "pass it through from the environment instead"]),
    Case("engine-api-key", {"fleet.yaml": BASE + "    engine:\n      api_key: abc\n"},
         ["fleet.yaml:5:7: models.chat.engine: engine arg 'api_key' would put a secret in the fleet file; set it "
          "through an environment variable (openai.api_keys names the variables for API keys)"]),
    Case("unknown-key-like-a-union-marker", {"fleet.yaml": BASE + "ray[: 1\nstr: 2\n"},
         ["fleet.yaml:4:1: ray[: unknown key 'ray['; did you mean 'ray'?",
          "fleet.yaml:5:1: str: unknown key 'str'; allowed here: daemon, defaults, inventory, models, openai, ray, "
          "settings, swap_groups"]),
    Case("engine-nested-date", {"fleet.yaml": BASE + "    engine:\n      hf_overrides: {released: 2024-01-01}\n"},
         ["fleet.yaml:5:7: models.chat.engine: engine arg 'hf_overrides' holds a date, .nan or .inf, which vLLM "
          "cannot take; quote it to pass a string"]),
    Case("engine-owned-arg", {"fleet.yaml": BASE + "    engine:\n      tensor_parallel_size: 2\n"},
         ["fleet.yaml:5:7: models.chat.engine: engine arg 'tensor_parallel_size' is set by the fleet; use "
          "tensor_parallel (or the number of gpus) instead"]),
    Case("model-name-slash", {"fleet.yaml": "models:\n  org/chat:\n    source: hf://org/chat\n"},
         ["fleet.yaml:2:3: models.org/chat: 'org/chat' cannot name a model: use 1-64 letters, digits, '.', '_' or "
          "'-', starting with a letter or digit (it becomes both the Serve application name and the OpenAI "
          "model id)"]),
    Case("model-name-router", {"fleet.yaml": "models:\n  router:\n    source: hf://org/chat\n"},
         ["fleet.yaml:2:3: models.router: 'router' is the name of the fleet's OpenAI router application; pick "
          "another name"]),
    Case("gpu-out-of-range", {"fleet.yaml": GPU3 + BASE + "    gpus: [3]\n"},
         ["fleet.yaml:9:12: models.chat.gpus[0]: GPU 3 does not exist; GPUs 0, 1, 2 (declared in inventory:)"]),
    Case("gpu-on-cpu-box", {"fleet.yaml": BASE + "    gpus: [0]\n"},
         ["fleet.yaml:4:12: models.chat.gpus[0]: GPU 0 does not exist; this box has no GPUs (NVML found none and "
          "the fleet declares no inventory)"]),
    Case("shares-over-one", {"fleet.yaml": GPU3 + """\
models:
  a: {source: hf://org/a, gpus: [2], gpu_memory: 0.6}
  b: {source: hf://org/b, gpus: [2], gpu_memory: 0.5}
"""}, ["fleet.yaml:8:50: models.b.gpu_memory: GPU 2 is shared by a (0.6), b (0.5): 1.1 of its memory in all, "
       "more than 1; lower their gpu_memory shares so they add up to at most 1"]),
    Case("two-default-shares", {"fleet.yaml": GPU3 + """\
models:
  a: {source: hf://org/a, gpus: [1]}
  b: {source: hf://org/b, gpus: [1]}
"""}, ["fleet.yaml:8:33: models.b.gpus: GPU 1 is shared by a (0.9), b (0.9): 1.8 of its memory in all, more than "
       "1; lower their gpu_memory shares so they add up to at most 1"]),
    Case("always-on-dont-fit", {"fleet.yaml": GPU3 + """\
models:
  embed-a: {source: hf://org/a, task: embed, gpus: [0], gpu_memory: 0.6, always_on: true}
  embed-b: {source: hf://org/b, task: embed, gpus: [0], gpu_memory: 0.5, always_on: true}
"""}, ["fleet.yaml:8:69: models.embed-b.gpu_memory: always-on models embed-a (0.6), embed-b (0.5) need 1.1 of "
       "GPU 0; always-on models stay loaded together, so their shares must add up to at most 1"]),
    Case("tp-heads", {"fleet.yaml": GPU3 + "models:\n  chat:\n    source: ./m/chat\n    gpus: [0, 1, 2]\n"},
         ["fleet.yaml:9:11: models.chat.gpus: tensor parallel size 3 does not divide the model's 32 attention "
          "heads; use a GPU count that divides 32"],
         model_dirs={"m/chat": {"config.json": '{"num_attention_heads": 32}'}}),
    Case("tp-mismatch", {"fleet.yaml": GPU3 + BASE + "    gpus: [0, 1]\n    tensor_parallel: 3\n"},
         ["fleet.yaml:8:5: models.chat: tensor_parallel is 3 but 2 gpus are listed; list tensor_parallel GPUs per "
          "replica (e.g. gpus: [0, 1] with tensor_parallel: 1 and replicas: 2 puts one replica on each), or drop "
          "tensor_parallel"]),
    Case("split-gpus-replicas", {"fleet.yaml": GPU3 + BASE + "    gpus: [0, 1]\n    tensor_parallel: 1\n"},
         ["fleet.yaml:8:5: models.chat.replicas: 2 gpus with tensor_parallel 1 make 2 sets of GPUs, one per "
          "replica, but replicas is 1; set replicas: 2, or list 1 gpus"]),
    Case("share-above-one", {"fleet.yaml": GPU3 + BASE + "    gpus: [0]\n    gpu_memory: 1.5\n"},
         ["fleet.yaml:10:17: models.chat.gpu_memory: Input should be less than or equal to 1 (got 1.5)"]),
    Case("weights-exceed-share", {"fleet.yaml": GPU3 + BASE + "    gpus: [0]\n    gpu_memory: 0.2\n    size: 16GiB\n"},
         ["fleet.yaml:10:17: models.chat.gpu_memory: the weights need 16.0 GiB per GPU but a share of 0.2 of GPU 0 "
          "is 4.8 GiB; raise gpu_memory or add GPUs"]),
    Case("bad-size", {"fleet.yaml": GPU3 + BASE + "    size: sixteen gigs\n"},
         ["fleet.yaml:9:11: models.chat.size: 'sixteen gigs' is not a size; write e.g. 24GiB, 16GB or 512MiB"]),
    Case("port-out-of-range", {"fleet.yaml": BASE + "openai:\n  port: 80000\n"},
         ["fleet.yaml:5:9: openai.port: Input should be less than or equal to 65535 (got 80000)"]),
    Case("many-errors-listed", {"fleet.yaml": BASE + "    replicas: 0\n    tsk: embed\n",
                                "fleet.d/b.yaml": "models:\n  two:\n    source: ftp://x\n"},
         ["fleet.d/b.yaml:3:13: models.two.source: unsupported source scheme 'ftp'; use hf://org/name[@revision], "
          "pkg://package/path, or a local path (/abs or ./relative)",
          "fleet.yaml:4:15: models.chat.replicas: Input should be greater than or equal to 1 (got 0)",
          "fleet.yaml:5:5: models.chat.tsk: unknown key 'tsk'; did you mean 'task'?"]),
    Case("swap-group-typo", {"fleet.yaml": GPU3 + "models:\n"
                             "  a: {source: hf://o/a, gpus: [0], gpu_memory: 0.6, swap_group: big}\n"
                             "  b: {source: hf://o/b, gpus: [1], gpu_memory: 0.6, swap_group: bgi}\n"},
         ["fleet.yaml:7:65: models.a.swap_group: swap group 'big' has no other member: a group is models that take "
          "turns; did you mean 'bgi'?",
          "fleet.yaml:8:65: models.b.swap_group: swap group 'bgi' has no other member: a group is models that take "
          "turns; did you mean 'big'?"]),
    Case("swap-group-unused-and-too-awake", {"fleet.yaml": "swap_groups:\n  big: {awake: 2}\n  spare: {}\n"
                                             "models:\n  a: {source: hf://o/a, swap_group: big}\n"
                                             "  b: {source: hf://o/b, swap_group: big}\n"},
         ["fleet.yaml:2:16: swap_groups.big.awake: awake: 2 but the group has 2 members, so they never take turns; "
          "lower awake below 2 or remove the group",
          "fleet.yaml:3:3: swap_groups.spare: no model names swap group 'spare'; add swap_group: spare to the models "
          "that take turns, or remove it"]),
    Case("swap-group-max-wait-and-default", {"fleet.yaml": "swap_groups:\n"
                                             "  g: {max_wait: 10m, queue_timeout: 1m, default: bb}\n"
                                             "models:\n  a: {source: hf://o/a, swap_group: g}\n"
                                             "  b: {source: hf://o/b, swap_group: g}\n"},
         ["fleet.yaml:2:17: swap_groups.g.max_wait: max_wait (600 s) is not below queue_timeout (60 s): a request "
          "would be answered 503 before the group swaps for it; lower max_wait or raise queue_timeout",
          "fleet.yaml:2:50: swap_groups.g.default: 'bb' is not a member of swap group 'g'; did you mean 'b'?"]),
    Case("swap-member-always-on-or-replicated", {"fleet.yaml": "models:\n"
                                                 "  a: {source: hf://o/a, swap_group: g, always_on: true}\n"
                                                 "  b: {source: hf://o/b, swap_group: g, replicas: 2}\n"},
         ["fleet.yaml:2:37: models.a.swap_group: an always_on model never leaves awake, so it cannot take turns in "
          "swap group 'g'; remove always_on or swap_group",
          "fleet.yaml:3:37: models.b.swap_group: a member of swap group 'g' runs one replica (the group decides when "
          "it is loaded); set replicas: 1 or leave the group"]),
    Case("swap-group-and-another-model-overbook", {"fleet.yaml": GPU3 + "models:\n"
         "  a: {source: hf://o/a, gpus: [0], gpu_memory: 0.6, swap_group: g}\n"
         "  b: {source: hf://o/b, gpus: [0], gpu_memory: 0.6, swap_group: g}\n"
         "  c: {source: hf://o/c, gpus: [0], gpu_memory: 0.5}\n"},
         ["fleet.yaml:9:48: models.c.gpu_memory: GPU 0 needs 1.16 of its memory at once, more than 1: swap group g on "
          "GPU 0: a 0.6, b 0.6 = 1.2 declared; 1 awake at once needs 0.66 (the 1 largest + 1 asleep holding ~1.5 GiB "
          "each); beside them c (0.5). Lower gpu_memory shares, or let fewer members of a swap group be awake at "
          "once"]),
    Case("swap-group-bad-name", {"fleet.yaml": BASE + "    swap_group: two words\n"},
         ["fleet.yaml:4:17: models.chat.swap_group: 'two words' cannot name a swap group: use 1-64 letters, digits, "
          "'.', '_' or '-', starting with a letter or digit"]),
    Case("node-not-an-ip", {"fleet.yaml": BASE + "    node: gpu-box-2\n"},
         ["fleet.yaml:4:11: models.chat.node: 'gpu-box-2' is not a node's IP address; name the node by the IP "
          "Ray knows it by (the --node-ip-address given to `ray start`, listed by `ray list nodes`), e.g. "
          "10.0.0.12"]),
    Case("node-without-gpus-in-inventory", {"fleet.yaml": GPU3 + BASE + "    size: 1GiB\n    node: 10.0.0.9\n"},
         ["fleet.yaml:10:11: models.chat.node: node 10.0.0.9 has no GPUs in the inventory; GPUs 0, 1, 2 (declared "
          "in inventory:). Declare its cards under inventory.gpus with node: set, or pick one of the listed "
          "nodes"]),
]
