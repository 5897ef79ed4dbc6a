#!/usr/bin/env bash
# The Triton kernels' tests (interpreter) and sm_90 compiles under another Triton release than .venv's:
# by default the GPU machine's (3.6), so a construct that release lacks or compiles differently shows
# up here, not in a GPU session's minutes. The release goes into .venv-triton-VERSION, in front of
# .venv's packages (a .pth line); numpy stays below 2.3 there because Triton 3.6's interpreter
# converts one-element arrays to scalars, which numpy 2.3 refuses. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-3.6.0}"
shift $(( $# > 0 ? 1 : 0 ))
bash scripts/setup.sh
env_dir=".venv-triton-$version"
if [ ! -x "$env_dir/bin/python" ]; then
    .venv/bin/python -m venv "$env_dir"
    "$env_dir/bin/python" -m pip install -q "triton==$version" "numpy<2.3"
    site=$("$env_dir/bin/python" -c "import sysconfig; print(sysconfig.get_path('purelib'))")
    .venv/bin/python -c "import sysconfig; print(sysconfig.get_path('purelib'))" > "$site/zz_loopserve_venv.pth"
fi
"$env_dir/bin/python" -c "import triton; print('triton', triton.__version__, 'from', triton.__file__)"
exec "$env_dir/bin/python" -m pytest -q -p no:cacheprovider -n 2 \
    tests/attention tests/model/test_gemv.py tests/model/test_gemv_tuning.py tests/model/test_gated_mlp.py \
    tests/unit/test_step_inputs.py \
    tests/model/test_fused_ops.py tests/unit/test_argmax.py tests/unit/test_sampler.py tests/spec \
    tests/engine/test_bench_scripts.py "$@"
