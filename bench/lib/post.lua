-- wrk script: POST a small chat completion request; headers from BENCH_HEADERS ("Name: value" lines);
-- at the end print one JSON line (prefixed BENCHJSON) with counts and latency percentiles in µs.
-- BENCH_CHECK_2XX=1 also counts every response whose status is not 2xx ("non2xx"; wrk itself only
-- counts >= 400): a per-response Lua call, so only scenarios that compare keygate with itself use it.
wrk.method = "POST"
wrk.body = '{"model":"' .. (os.getenv("BENCH_MODEL") or "bench") .. '","messages":[{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":64}'
wrk.headers["Content-Type"] = "application/json"
for line in string.gmatch(os.getenv("BENCH_HEADERS") or "", "[^\n]+") do
  local k, v = string.match(line, "^%s*([^:]+):%s*(.-)%s*$")
  if k then wrk.headers[k] = v end
end

local check_2xx = os.getenv("BENCH_CHECK_2XX") == "1"
local threads = {}
non2xx = 0

setup = function(thread)
  table.insert(threads, thread)
end

if check_2xx then
  response = function(status, headers, body)
    if status < 200 or status > 299 then non2xx = non2xx + 1 end
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  -- -1: not checked
  local bad = -1
  if check_2xx then
    bad = 0
    for _, t in ipairs(threads) do bad = bad + (t:get("non2xx") or 0) end
  end
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d,"non2xx":%d,"lat_p50_us":%d,"lat_p90_us":%d,"lat_p99_us":%d,"lat_mean_us":%.1f,"lat_max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout, bad,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
