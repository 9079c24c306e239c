-- wrk script for load/bench.py: optional request body, and one JSON line with every
-- figure the report needs (wrk's own --latency stops at p99; this adds p99.9).
--
--   wrk -t1 -c64 -d5s -s load/wrk_stats.lua URL                 -- GET
--   wrk -t1 -c64 -d5s -s load/wrk_stats.lua URL -- POST 1048576 -- POST a 1 MiB body

function init(args)
   if args[1] ~= nil then
      wrk.method = args[1]
   end
   if args[2] ~= nil then
      wrk.body = string.rep("x", tonumber(args[2]))
      wrk.headers["Content-Type"] = "application/octet-stream"
   end
end

function done(summary, latency, requests)
   local e = summary.errors
   local p = function(q) return latency:percentile(q) end
   io.write(string.format(
      'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,'
         .. '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,'
         .. '"mean_us":%.1f,"max_us":%d,"p50_us":%d,"p75_us":%d,"p90_us":%d,'
         .. '"p99_us":%d,"p999_us":%d}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.mean, latency.max, p(50), p(75), p(90), p(99), p(99.9)))
end
