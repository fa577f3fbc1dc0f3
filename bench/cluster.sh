# Sourced by the benchmarks that need several engines: etcd on loopback and N engines, each on its
# own file-backed pool under $DIR/nN, replication over mutual TLS when TLS=1. Expects DIR, BIN and
# a PIDS array (the caller's cleanup kills them); sets SDK to node-1's SDK address (and
# STRATA_CA_FILE with TLS, for stratactl), and ENGINE_PIDS to the engines' process ids. An
# ENGINE_WRAP array runs each engine under that command (e.g. valgrind).
#   start_cluster ETCD_PORT ENGINES POOL_SIZE
start_cluster() {
  local port=$1 n=$2 pool=$3 i
  ENGINE_PIDS=()
  etcd --name bench --data-dir "$DIR/etcd" --listen-client-urls "http://127.0.0.1:$port" \
    --advertise-client-urls "http://127.0.0.1:$port" --listen-peer-urls "http://127.0.0.1:$((port + 10))" \
    --initial-advertise-peer-urls "http://127.0.0.1:$((port + 10))" --initial-cluster "bench=http://127.0.0.1:$((port + 10))" >"$DIR/etcd.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.1; done
  [ "$TLS" = 1 ] && "$BIN/strata-engine" certs init --dir "$DIR/ca" >/dev/null
  for i in $(seq "$n"); do
    mkdir -p "$DIR/n$i"
    local tls_args=()
    if [ "$TLS" = 1 ]; then
      "$BIN/strata-engine" certs issue --ca-dir "$DIR/ca" --node-id "node-$i" --out "$DIR/n$i/tls" >/dev/null
      tls_args=(--tls-dir "$DIR/n$i/tls")
    fi
    ${ENGINE_WRAP[@]+"${ENGINE_WRAP[@]}"} "$BIN/strata-engine" --etcd "http://127.0.0.1:$port" --node-id "node-$i" --data-dir "$DIR/n$i/data" "${tls_args[@]}" \
      --device "$DIR/n$i/pool.img" --device-size "$pool" \
      --nbd-listen 127.0.0.1:0 --sdk-listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --repl-listen 127.0.0.1:0 \
      --nbd-socket "$DIR/n$i/nbd.sock" --ready-file "$DIR/n$i/ready.json" 2>"$DIR/n$i/engine.log" &
    PIDS+=($!)
    ENGINE_PIDS+=($!)
  done
  for i in $(seq "$n"); do for _ in $(seq 1200); do [ -f "$DIR/n$i/ready.json" ] && break; sleep 0.05; done; done
  SDK=$(python3 -c "import json;print(json.load(open('$DIR/n1/ready.json'))['sdk'])")
  # With a certificate the SDK is TLS only: stratactl checks it against the CA.
  if [ "$TLS" = 1 ]; then export STRATA_CA_FILE="$DIR/ca/ca.crt"; fi
}

# CPU seconds (user + system) the engines have used so far.
engines_cpu() {
  local p ticks=0 hz
  hz=$(getconf CLK_TCK)
  for p in "${ENGINE_PIDS[@]}"; do
    ticks=$((ticks + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  python3 -c "print($ticks / $hz)"
}
