-- wrk script of bench/bench.py (docs/performance.md): replays pre-built raw
-- HTTP/1.1 requests round robin and prints one parseable result line.
--
--   wrk -t1 -c32 -d8s -s bench/replay.lua http://127.0.0.1:PORT/ -- REQUESTS [ONCE]
--
-- REQUESTS holds records "LENGTH\n" followed by LENGTH bytes of a complete
-- request (request line, headers with Host and Content-Length, body), as
-- bench.py writes them: SigV4-signed p11kmsd requests, one per key, valid for
-- the server's 5-minute window, or one unsigned request for bench/mhd_canned.
-- Each wrk thread loads them all and starts at its own offset.
--
-- With ONCE (a number; one wrk thread only), the run ends after ONCE answers
-- instead of at the end of -d: the thread stops and sends wrk itself SIGINT,
-- which ends wrk's wait early as ^C does (done() still prints the result).
-- bench.py passes the number of requests plus the connections, so that every
-- request in the file has been sent and answered at least once (a warm-up, or
-- "every key used once"). Only then is response() defined: wrk reads answers'
-- headers and bodies only for a script that has one.

local reqs = {}
local count = 0
local next_index = 0
local threads = 0

function setup(thread)
   thread:set("thread_number", threads)
   threads = threads + 1
end

function init(args)
   local f = assert(io.open(args[1], "rb"))
   local data = f:read("*a")
   f:close()
   local pos = 1
   while pos <= #data do
      local nl = assert(string.find(data, "\n", pos, true), "bad request file")
      local len = assert(tonumber(string.sub(data, pos, nl - 1)), "bad request length")
      count = count + 1
      reqs[count] = string.sub(data, nl + 1, nl + len)
      pos = nl + 1 + len
   end
   assert(count > 0, "no requests")
   next_index = ((thread_number or 0) * 7919) % count
   local once = tonumber(args[2])
   if once then
      local answered = 0
      local ffi = require("ffi")
      ffi.cdef("int kill(int pid, int sig); int getpid(void);")
      response = function(status, headers, body)
         answered = answered + 1
         if answered == once then
            wrk.thread:stop()
            ffi.C.kill(ffi.C.getpid(), 2)
         end
      end
   end
end

function request()
   next_index = next_index + 1
   if next_index > count then
      next_index = 1
   end
   return reqs[next_index]
end

-- wrk counts answers with a status above 399 in errors.status.
function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      "wrk_result requests=%d duration_us=%d rps=%.1f p50_us=%d p99_us=%d p999_us=%d max_us=%d " ..
      "non2xx=%d connect=%d read=%d write=%d timeout=%d\n",
      summary.requests, summary.duration, summary.requests / (summary.duration / 1e6),
      latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max,
      e.status, e.connect, e.read, e.write, e.timeout))
end
