// Node `cluster` reference for the hand-off benchmark: the primary accepts and hands each
// connection to a worker, round robin (cluster.SCHED_RR, the default on Linux).
// Every worker does what the Python workers do: read the request, write a 64-byte response,
// close. Usage: node handoff_node.js PORT  (prints one JSON line when both workers listen)
"use strict";
const cluster = require("node:cluster");
const net = require("node:net");

const port = Number(process.argv[2]);
const WORKERS = 2;
cluster.schedulingPolicy = cluster.SCHED_RR;

if (cluster.isPrimary) {
  const pids = [];
  for (let i = 0; i < WORKERS; i++) {
    const worker = cluster.fork();
    worker.on("listening", () => {
      pids.push(worker.process.pid);
      if (pids.length === WORKERS) {
        process.stdout.write(JSON.stringify({ port, acceptor: process.pid, workers: pids }) + "\n");
      }
    });
  }
  process.stdin.resume();
  process.stdin.on("end", () => {
    for (const id in cluster.workers) cluster.workers[id].process.kill();
    process.exit(0);
  });
} else {
  const response = Buffer.from("ok 0".padEnd(63, " ") + "\n");
  net
    .createServer({ noDelay: true }, (sock) => {
      sock.once("data", () => sock.end(response));
      sock.on("error", () => {});
    })
    .listen({ port, host: "127.0.0.1", backlog: 1024 });
}
