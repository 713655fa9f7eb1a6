#!/usr/bin/env bash
# Render the MLflow UI page of a run in headless Chromium and save a PNG, to look at a run's
# charts without a browser:
#   scripts/mlflow_screenshot.sh RUN_OUTPUT_DIR [RUN_NAME] [OUT.png]     (SCREENSHOT_HEIGHT=3000: a longer page)
# RUN_OUTPUT_DIR is train.output_dir of the runs (it holds mlflow.db, the default local store);
# RUN_NAME defaults to the newest run. A private `mlflow ui` on a free 127.0.0.1 port serves the
# store and is stopped by its PID afterwards; Chromium is kept off the network.
set -euo pipefail
OUTPUT_DIR=$(realpath "${1:?usage: $0 RUN_OUTPUT_DIR [RUN_NAME] [OUT.png]}")
RUN_NAME=${2:-}
OUT=$(realpath -m "${3:-mlflow_run.png}")
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
DB="$OUTPUT_DIR/mlflow.db"
[[ -f $DB ]] || { echo "error: $DB does not exist (no local MLflow store under $OUTPUT_DIR)" >&2; exit 2; }
CHROME=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[[ -n $CHROME ]] || { echo "error: chromium is not installed (apt-get install chromium)" >&2; exit 2; }

PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false "$(dirname "$PY")/mlflow" ui --backend-store-uri "sqlite:///$DB" \
    --host 127.0.0.1 --port "$PORT" --workers 1 >"$OUT.server.log" 2>&1 &
UI_PID=$!
trap 'kill $UI_PID 2>/dev/null; wait $UI_PID 2>/dev/null || true' EXIT
for _ in $(seq 180); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    kill -0 $UI_PID 2>/dev/null || { echo "error: mlflow ui exited: $(tail -5 "$OUT.server.log")" >&2; exit 1; }
    sleep 0.5
done

# experiment id and run id of the run to show
read -r EXP_ID RUN_ID < <("$PY" - "$PORT" "$RUN_NAME" <<'PYEOF'
import sys
from mlflow.tracking import MlflowClient
client = MlflowClient(f"http://127.0.0.1:{sys.argv[1]}")
exps = [e.experiment_id for e in client.search_experiments()]
flt = f"attributes.run_name = '{sys.argv[2]}'" if sys.argv[2] else ""
runs = client.search_runs(exps, filter_string=flt, order_by=["attributes.start_time DESC"], max_results=1)
if not runs:
    sys.exit(f"error: no run {sys.argv[2]!r} in the store")
print(runs[0].info.experiment_id, runs[0].info.run_id)
PYEOF
)
URL="http://127.0.0.1:$PORT/#/experiments/$EXP_ID/runs/$RUN_ID/model-metrics"
"$CHROME" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,${SCREENSHOT_HEIGHT:-1400} \
    --host-resolver-rules="MAP * ~NOTFOUND , EXCLUDE 127.0.0.1" --virtual-time-budget=120000 --run-all-compositor-stages-before-draw \
    --screenshot="$OUT" "$URL" >/dev/null 2>&1
rm -f "$OUT.server.log"
echo "run $RUN_ID ($URL) -> $OUT"
