#!/usr/bin/env node
// What a CI pipeline does with Berth, from Node.js, through the public gRPC
// API only (package berth.v1, loaded from protos/berth/v1/*.proto at run
// time with @grpc/proto-loader; no generated code).
//
//   create a project (admin key) -> its API key
//   register two deployments by image reference -> preview
//   set a secret
//   promote each to staging, then to production (confirmed)
//   roll production back, read the history of every environment
//   read deployment status and errors from the scheduler
//   bad input: the status code and message of each mistake
//
// Configuration (environment):
//   BERTH_ADMIN_KEY        the platform's admin key (required; `berth up` writes
//                          it to <data dir>/admin.key)
//   BERTH_IMAGE            image reference to deploy (required; present on the
//                          engine or pullable by it)
//   BERTH_REGISTRY_ADDR    default 127.0.0.1:50051
//   BERTH_SECRETS_ADDR     default 127.0.0.1:50052
//   BERTH_SCHEDULER_ADDR   default 127.0.0.1:50053
//   BERTH_PROJECT_NAME     default ci-<random>
//   BERTH_HEALTH_PATH      the worker's health path, default "/"
//   BERTH_WORKER_PORT      the port the worker listens on ($PORT), default 8080
//   BERTH_WAIT_SECONDS     how long to wait for replicas and errors, default 120
//   BERTH_ROUTER_URL       optional: also check that the router serves the
//                          rolled-back deployment in production
//   BERTH_ROUTER_PATH      path requested there, default "/"
//   BERTH_BROKEN_IMAGE     optional: an image that cannot be pulled; deployed
//                          to an environment of its own to see the scheduler
//                          report an image_pull_error
//   BERTH_PROTOS_DIR       default: the repository's protos/ directory
//
// Output: one JSON line on stdout (the summary). Exit code 0 when every check
// passed, 1 when one failed (each failure named on stderr and in the summary),
// 2 for a configuration error.

import { readdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { randomBytes } from "node:crypto";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const HERE = dirname(fileURLToPath(import.meta.url));
const env = process.env;
const started = Date.now();

function configError(message) {
  process.stderr.write(`berth-client: ${message}\n`);
  process.stdout.write(JSON.stringify({ ok: false, error: message }) + "\n");
  process.exit(2);
}

const config = {
  registry: env.BERTH_REGISTRY_ADDR || "127.0.0.1:50051",
  secrets: env.BERTH_SECRETS_ADDR || "127.0.0.1:50052",
  scheduler: env.BERTH_SCHEDULER_ADDR || "127.0.0.1:50053",
  adminKey: env.BERTH_ADMIN_KEY || "",
  image: env.BERTH_IMAGE || "",
  projectName: env.BERTH_PROJECT_NAME || `ci-${randomBytes(4).toString("hex")}`,
  healthPath: env.BERTH_HEALTH_PATH || "/",
  workerPort: Number(env.BERTH_WORKER_PORT || 8080),
  waitMs: Number(env.BERTH_WAIT_SECONDS || 120) * 1000,
  routerUrl: (env.BERTH_ROUTER_URL || "").replace(/\/+$/, ""),
  routerPath: env.BERTH_ROUTER_PATH || "/",
  brokenImage: env.BERTH_BROKEN_IMAGE || "",
  protosDir: resolve(env.BERTH_PROTOS_DIR || join(HERE, "..", "..", "..", "protos")),
};
if (!config.adminKey) configError("BERTH_ADMIN_KEY is not set (berth up writes it to <data dir>/admin.key)");
if (!config.image) configError("BERTH_IMAGE is not set (an image reference the Docker engine has or can pull)");
if (!Number.isInteger(config.workerPort) || config.workerPort <= 0) configError("BERTH_WORKER_PORT is not a port");
if (!(config.waitMs > 0)) configError("BERTH_WAIT_SECONDS must be a positive number");

// ------------------------------------------------------------------ protos

// Only the public package: every file of protos/berth/v1. Service-to-service
// RPCs live in berth.internal.v1 (protos/berth/internal/...), never loaded.
let publicFiles;
try {
  publicFiles = readdirSync(join(config.protosDir, "berth", "v1"))
    .filter((name) => name.endsWith(".proto"))
    .sort()
    .map((name) => `berth/v1/${name}`);
} catch (err) {
  configError(`cannot read ${join(config.protosDir, "berth", "v1")}: ${err.message}`);
}
const definition = protoLoader.loadSync(publicFiles, {
  includeDirs: [config.protosDir],
  keepCase: true, // field names exactly as in the .proto files
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const v1 = grpc.loadPackageDefinition(definition).berth.v1;
for (const name of ["Registry", "Secrets", "Scheduler"]) {
  if (typeof v1?.[name] !== "function") configError(`service berth.v1.${name} not found in ${publicFiles.join(", ")}`);
}
const loadedPackages = [...new Set(Object.keys(definition).map((n) => n.split(".").slice(0, -1).join(".")))].sort();

const registry = new v1.Registry(config.registry, grpc.credentials.createInsecure());
const secrets = new v1.Secrets(config.secrets, grpc.credentials.createInsecure());
const scheduler = new v1.Scheduler(config.scheduler, grpc.credentials.createInsecure());

// ------------------------------------------------------------------ calls

const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

/** One unary call with the key in the `x-api-key` metadata and a deadline. */
function call(client, method, request, apiKey, timeoutMs = 15000) {
  const metadata = new grpc.Metadata();
  if (apiKey) metadata.set("x-api-key", apiKey);
  return new Promise((resolvePromise, reject) => {
    client[method](request, metadata, { deadline: Date.now() + timeoutMs }, (err, response) => {
      if (err) {
        err.codeName = CODE_NAMES[err.code] ?? String(err.code);
        err.message = `${method}: ${err.codeName}: ${err.details}`;
        reject(err);
      } else {
        resolvePromise(response);
      }
    });
  });
}

const openWatches = [];

/** A `Registry.WatchEnvironments` stream (no deadline: it lives as long as
 *  the pipeline watches). `opened` resolves at the `snapshot_complete`
 *  marker (with `opening`, the events before it) or rejects with the call's
 *  error; `live` collects every event after the marker. */
function watchEnvironments(request, apiKey) {
  const metadata = new grpc.Metadata();
  if (apiKey) metadata.set("x-api-key", apiKey);
  const stream = registry.WatchEnvironments(request, metadata);
  openWatches.push(stream);
  const watch = { stream, opening: [], marker: null, live: [], error: null };
  watch.opened = new Promise((resolveOpened, rejectOpened) => {
    stream.on("data", (event) => {
      if (watch.marker) {
        watch.live.push(event);
      } else if (event.snapshot_complete) {
        watch.marker = event;
        resolveOpened(watch);
      } else {
        watch.opening.push(event);
      }
    });
    stream.on("error", (err) => {
      err.codeName = CODE_NAMES[err.code] ?? String(err.code);
      err.message = `WatchEnvironments: ${err.codeName}: ${err.details}`;
      watch.error = err;
      rejectOpened(err);
    });
    stream.on("end", () => rejectOpened(new Error("WatchEnvironments ended before its snapshot_complete marker")));
  });
  const timer = setTimeout(() => stream.cancel(), config.waitMs);
  watch.opened.then(() => clearTimeout(timer), () => clearTimeout(timer));
  return watch;
}

/** The pointer moves a watch saw: [environment, kind, sequence, deployment, revision]. */
const movesOf = (events) =>
  events
    .filter((e) => e.change === "moved")
    .map((e) => [e.moved.environment.name, short(e.moved.entry.kind), Number(e.moved.entry.sequence), e.moved.entry.deployment_id, e.revision]);

// google.rpc.Status from the `grpc-status-details-bin` trailer, decoded by
// hand (Status {int32 code = 1; string message = 2; repeated Any details = 3},
// Any {string type_url = 1; bytes value = 2}) so no extra package is needed.
function readVarint(buf, pos) {
  let value = 0;
  let shift = 0;
  for (;;) {
    if (pos >= buf.length) throw new Error("truncated varint");
    const byte = buf[pos++];
    value += (byte & 0x7f) * 2 ** shift;
    if (!(byte & 0x80)) return [value, pos];
    shift += 7;
  }
}
function fields(buf) {
  const out = [];
  let pos = 0;
  while (pos < buf.length) {
    let key;
    [key, pos] = readVarint(buf, pos);
    const number = Math.floor(key / 8);
    const wire = key & 7;
    if (wire === 0) {
      let value;
      [value, pos] = readVarint(buf, pos);
      out.push([number, value]);
    } else if (wire === 2) {
      let length;
      [length, pos] = readVarint(buf, pos);
      out.push([number, buf.subarray(pos, pos + length)]);
      pos += length;
    } else if (wire === 1) {
      pos += 8;
    } else if (wire === 5) {
      pos += 4;
    } else {
      throw new Error(`unsupported wire type ${wire}`);
    }
  }
  return out;
}
function anyDetails(err) {
  const raw = err?.metadata?.get?.("grpc-status-details-bin") ?? [];
  if (!raw.length) return [];
  return fields(Buffer.from(raw[0]))
    .filter(([number]) => number === 3)
    .map(([, any]) => {
      const parts = fields(any);
      return {
        type: parts.find(([n]) => n === 1)?.[1]?.toString("utf8") ?? "?",
        value: parts.find(([n]) => n === 2)?.[1] ?? Buffer.alloc(0),
      };
    });
}
const text = (parts, number) => parts.find(([n]) => n === number)?.[1]?.toString("utf8") ?? "";
/** The type names of the google.rpc.Status details an error carried. */
function statusDetails(err) {
  try {
    return anyDetails(err).map((d) => d.type);
  } catch (decodeError) {
    return [`undecodable: ${decodeError.message}`];
  }
}
/** google.rpc.ErrorInfo {reason = 1; domain = 2; map<string, string> metadata = 3}
 *  and google.rpc.BadRequest {repeated FieldViolation field_violations = 1 {field = 1; description = 2}}. */
function decodedDetails(err) {
  const out = { reason: null, domain: null, metadata: {}, field_violations: [] };
  try {
    for (const { type, value } of anyDetails(err)) {
      if (type.endsWith("/google.rpc.ErrorInfo")) {
        const parts = fields(value);
        out.reason = text(parts, 1);
        out.domain = text(parts, 2);
        for (const [n, entry] of parts) {
          if (n === 3) out.metadata[text(fields(entry), 1)] = text(fields(entry), 2);
        }
      } else if (type.endsWith("/google.rpc.BadRequest")) {
        for (const [n, violation] of fields(value)) {
          if (n === 1) out.field_violations.push({ field: text(fields(violation), 1), description: text(fields(violation), 2) });
        }
      }
    }
  } catch (decodeError) {
    out.reason = `undecodable: ${decodeError.message}`;
  }
  return out;
}

// ------------------------------------------------------------------ checks

const summary = {
  ok: false,
  project: null,
  deployments: {},
  image: config.image,
  image_id: "",
  history: {},
  status: null,
  errors: {},
  router: null,
  watch: null,
  bad_input: {},
  checks: [],
  failures: [],
  skipped: [],
  loaded_packages: loadedPackages,
  // RPCs marked internal that the loaded berth.v1 files still declare (empty
  // once they moved to berth.internal.v1); this client calls none of them.
  internal_methods_declared: [],
  elapsed_ms: 0,
};

class Failed extends Error {}

function assert(condition, message) {
  if (!condition) throw new Failed(message);
}

/** Runs one named step; a failure is recorded and, unless `optional`, ends the run. */
async function step(name, fn, { fatal = true } = {}) {
  const t0 = Date.now();
  try {
    const value = await fn();
    summary.checks.push({ name, ok: true, ms: Date.now() - t0 });
    return value;
  } catch (err) {
    const message = err instanceof Failed ? err.message : `${err.message ?? err}`;
    summary.checks.push({ name, ok: false, ms: Date.now() - t0, error: message });
    summary.failures.push(`${name}: ${message}`);
    if (fatal) throw new Failed(`stopped at ${name}`);
    return undefined;
  }
}

/** Polls `probe` until it returns something truthy or the wait runs out. */
async function eventually(what, probe, timeoutMs = config.waitMs) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await probe();
      if (last && last.done !== false) return last;
    } catch (err) {
      last = err.message ?? String(err);
    }
    if (Date.now() > deadline) {
      throw new Failed(`${what} not reached within ${timeoutMs / 1000}s; last: ${JSON.stringify(last?.seen ?? last)}`);
    }
    await new Promise((r) => setTimeout(r, 500));
  }
}

/** Expects `promise` to fail with `codeName`, its message matching `pattern`,
 *  carrying an ErrorInfo with a reason (and, when given, `reason` itself; on
 *  INVALID_ARGUMENT a BadRequest naming `field`). */
async function expectError(name, promise, codeName, pattern, { reason = null, field = null } = {}) {
  await step(
    name,
    async () => {
      let err;
      try {
        const response = await promise;
        throw new Failed(`expected ${codeName}, the call succeeded: ${JSON.stringify(response).slice(0, 300)}`);
      } catch (e) {
        if (e instanceof Failed) throw e;
        err = e;
      }
      const decoded = decodedDetails(err);
      summary.bad_input[name] = {
        code: err.codeName, message: err.details, details: statusDetails(err),
        reason: decoded.reason, metadata: decoded.metadata, fields: decoded.field_violations.map((v) => v.field),
      };
      assert(err.codeName === codeName, `expected ${codeName}, got ${err.codeName}: ${err.details}`);
      assert(pattern.test(err.details ?? ""), `message ${JSON.stringify(err.details)} does not match ${pattern}`);
      assert(decoded.reason && decoded.domain === "berth.dev", `no ErrorInfo in the status details: ${JSON.stringify(decoded)}`);
      if (reason) assert(decoded.reason === reason, `reason ${decoded.reason}, expected ${reason}`);
      if (field) {
        assert(decoded.field_violations.some((v) => v.field === field), `no BadRequest naming ${field}: ${JSON.stringify(decoded)}`);
      }
    },
    { fatal: false },
  );
}

// Kinds and states are enums (HistoryEntry.Kind KIND_PROMOTE, loaded with
// `enums: String`); the contract's word is the lower-case name after the
// enum's prefix ("promote").
const norm = (value) => String(value ?? "").toLowerCase();
const isKind = (value, kind) => norm(value) === kind || norm(value).endsWith(`_${kind}`);
const KNOWN = [
  "deploy", "promote", "rollback", // history entry kinds
  "deploying", "running", "degraded", "failed", "scaled_to_zero", "terminated", // binding status
  "pending", "starting", "ready", "unhealthy", "exited", // replica states
  "image_pull_error", "scheduling_failure", "crash_loop", "oom_killed", "health_check_failed", "node_down", // error kinds
];
/** The plain lower-case name of a kind or state, whichever form the server sends. */
const short = (value) => KNOWN.filter((k) => isKind(value, k)).sort((a, b) => b.length - a.length)[0] ?? norm(value);

// ------------------------------------------------------------------ the pipeline

async function pipeline() {
  for (const service of [v1.Registry, v1.Secrets, v1.Scheduler]) {
    for (const [method, spec] of Object.entries(service.service)) {
      if (/^(Authenticate|ResolveImage|Watch|ResolveSecrets|WatchEndpoints|ReportLoad|Activate)$/.test(method)) {
        summary.internal_methods_declared.push(spec.path);
      }
    }
  }

  const created = await step("create_project", async () => {
    const r = await call(registry, "CreateProject", { name: config.projectName }, config.adminKey);
    assert(r.project?.name === config.projectName, `project name ${r.project?.name}`);
    assert(/^prj_[0-9a-f]{12}$/.test(r.project?.id ?? ""), `project id ${r.project?.id}`);
    assert(r.api_key, "no api_key in the answer");
    return r;
  });
  const key = created.api_key;
  const project = created.project.id;
  summary.project = { id: created.project.id, name: created.project.name };

  // Wait for moves by watching the project, with its own key (issue 13).
  const watch = await step("watch_open", async () => {
    const w = await watchEnvironments({ project }, key).opened;
    assert(w.marker.resumed === false, "a watch from revision 0 must open with the current state");
    const names = w.opening.filter((e) => e.change === "environment").map((e) => e.environment.name).sort();
    assert(JSON.stringify(names) === JSON.stringify(["preview", "production", "staging"]), `opening environments ${names}`);
    return w;
  });

  await step("list_environments", async () => {
    const r = await call(registry, "ListEnvironments", { project }, key);
    const byName = Object.fromEntries(r.environments.map((e) => [e.name, e]));
    for (const name of ["preview", "staging", "production"]) assert(byName[name], `no environment ${name}`);
    assert(byName.production.protected === true, "production is not protected");
  });

  const secretValue = `ci-canary-${randomBytes(8).toString("hex")}`;
  await step("set_secret", async () => {
    const r = await call(secrets, "SetSecret", { project, name: "CI_TOKEN", type: "token", value: secretValue }, key);
    assert(r.name === "CI_TOKEN" && Number(r.version) === 1, `answer ${JSON.stringify(r)}`);
    assert(isKind(r.scope, "project"), `scope ${r.scope}`);
    const listed = await call(secrets, "ListSecrets", { project }, key);
    assert(listed.secrets.some((s) => s.name === "CI_TOKEN"), "CI_TOKEN not listed");
    assert(!JSON.stringify(listed).includes(secretValue), "ListSecrets shows the value");
  });

  const deploy = async (release) => {
    const r = await call(
      registry,
      "Deploy",
      {
        project,
        image: config.image,
        config: { port: config.workerPort, health_path: config.healthPath, variables: { RELEASE: release } },
        environment: "preview",
        min_replicas: 1,
        max_replicas: 1,
        reason: `ci ${release}`,
      },
      key,
    );
    assert(/^dep_[0-9a-f]{12}$/.test(r.deployment?.id ?? ""), `deployment id ${r.deployment?.id}`);
    assert(r.deployment.image === config.image, `image ${r.deployment.image}`);
    assert(r.environment?.name === "preview", `environment ${r.environment?.name}`);
    assert(isKind(r.entry?.kind, "deploy"), `entry kind ${r.entry?.kind}`);
    return r.deployment.id;
  };
  const d1 = await step("deploy_v1", () => deploy("v1"));
  const d2 = await step("deploy_v2", () => deploy("v2"));
  summary.deployments = { v1: d1, v2: d2 };

  const promote = async (deployment, target, expectedPrevious) => {
    const r = await call(
      registry,
      "Promote",
      { project, deployment_id: deployment, target_environment: target, min_replicas: 1, max_replicas: 1, confirm: target === "production" },
      key,
    );
    assert(r.environment?.deployment_id === deployment, `pointer ${r.environment?.deployment_id}`);
    assert(isKind(r.entry?.kind, "promote"), `entry kind ${r.entry?.kind}`);
    assert(r.entry.previous_deployment_id === expectedPrevious, `previous ${r.entry.previous_deployment_id}, expected ${expectedPrevious || "none"}`);
  };
  await step("promote_v1_staging", () => promote(d1, "staging", ""));
  await step("promote_v1_production", () => promote(d1, "production", ""));
  await step("promote_v2_staging", () => promote(d2, "staging", d1));
  await step("promote_v2_production", () => promote(d2, "production", d1));

  await step("rollback_production", async () => {
    const r = await call(registry, "Rollback", { project, environment: "production", confirm: true, reason: "ci rollback" }, key);
    assert(r.environment?.deployment_id === d1, `pointer ${r.environment?.deployment_id}, expected ${d1}`);
    assert(isKind(r.entry?.kind, "rollback"), `entry kind ${r.entry?.kind}`);
    assert(r.entry.previous_deployment_id === d2, `previous ${r.entry.previous_deployment_id}`);
  });

  const expectedMoves = [
    ["preview", "deploy", 1, d1], ["preview", "deploy", 2, d2],
    ["staging", "promote", 1, d1], ["production", "promote", 1, d1],
    ["staging", "promote", 2, d2], ["production", "promote", 2, d2],
    ["production", "rollback", 3, d1],
  ];
  const sameMoves = (got, expected) =>
    got.length === expected.length && expected.every((m, i) => m.every((v, j) => got[i][j] === v));
  const watched = await step("watch_moves", async () => {
    const got = await eventually("every move on the watch", async () => {
      const moves = movesOf(watch.live);
      return moves.length >= expectedMoves.length ? moves : { done: false, seen: moves };
    });
    assert(sameMoves(got, expectedMoves), `moves ${JSON.stringify(got)}, expected ${JSON.stringify(expectedMoves)}`);
    const revisions = got.map((m) => Number(m[4]));
    assert(revisions.every((r, i) => i === 0 || r > revisions[i - 1]), `revisions ${revisions} do not increase`);
    assert(revisions[0] > Number(watch.marker.revision), "a move at or before the opening's revision");
    const projects = new Set(watch.live.map((e) => (e.moved?.environment ?? e.binding ?? e.created ?? e.deleted)?.project_id));
    assert(projects.size === 1 && projects.has(project), `events of projects ${[...projects]}`);
    watch.stream.cancel();
    summary.watch = { moves: got.map((m) => m.slice(0, 4)), revisions };
    return got;
  });
  await step("watch_resume", async () => {
    // Reconnect from the revision of the fourth move: only what came after.
    const since = watched[3][4];
    const w = await watchEnvironments({ project, since_revision: since }, key).opened;
    w.stream.cancel();
    assert(w.marker.resumed === true, "the watch did not resume from since_revision");
    const replay = movesOf(w.opening);
    assert(sameMoves(replay, expectedMoves.slice(4)), `replay ${JSON.stringify(replay)}`);
    summary.watch.resumed = replay.map((m) => m.slice(0, 4));
  });

  const expectedHistory = {
    preview: [["deploy", d1], ["deploy", d2]],
    staging: [["promote", d1], ["promote", d2]],
    production: [["promote", d1], ["promote", d2], ["rollback", d1]],
  };
  for (const [environment, expected] of Object.entries(expectedHistory)) {
    await step(`history_${environment}`, async () => {
      const r = await call(registry, "ListHistory", { project, environment }, key);
      const entries = r.entries.map((e) => ({
        sequence: Number(e.sequence),
        kind: short(e.kind),
        deployment_id: e.deployment_id,
        previous_deployment_id: e.previous_deployment_id,
        actor: e.actor,
      }));
      summary.history[environment] = entries;
      const got = entries.map((e) => [e.kind, e.deployment_id]);
      assert(
        got.length === expected.length && expected.every(([kind, dep], i) => isKind(got[i][0], kind) && got[i][1] === dep),
        `entries ${JSON.stringify(got)}, expected ${JSON.stringify(expected)}`,
      );
      assert(entries.every((e, i) => i === 0 || e.sequence > entries[i - 1].sequence), "sequences do not increase");
    });
  }

  await step("image_resolved", async () => {
    const dep = await eventually("image_id resolved by the scheduler", async () => {
      const r = await call(registry, "GetDeployment", { project, deployment_id: d1 }, key);
      return r.image_id ? r : { done: false, seen: r.image_id };
    });
    assert(/^sha256:[0-9a-f]{64}$/.test(dep.image_id), `image_id ${dep.image_id}`);
    summary.image_id = dep.image_id;
  });

  await step("status_v1_running_in_production", async () => {
    const status = await eventually("v1 running in production", async () => {
      const r = await call(scheduler, "GetDeploymentStatus", { project, deployment_id: d1 }, key);
      const production = r.bindings.find((b) => b.environment === "production");
      const ready = (production?.replicas ?? []).filter((x) => isKind(x.state, "ready")).length;
      const seen = r.bindings.map((b) => ({ environment: b.environment, status: short(b.status), serving: b.serving }));
      return production && isKind(production.status, "running") && ready >= 1 ? r : { done: false, seen };
    });
    assert(status.deployment?.id === d1, `status of ${status.deployment?.id}`);
    const production = status.bindings.find((b) => b.environment === "production");
    assert(production.serving === true, "production binding of v1 is not serving after the rollback");
    summary.status = {
      deployment_id: status.deployment.id,
      bindings: status.bindings.map((b) => ({
        environment: b.environment,
        status: short(b.status),
        serving: b.serving,
        min_replicas: b.min_replicas,
        max_replicas: b.max_replicas,
        replicas: b.replicas.map((x) => short(x.state)),
      })),
    };
    const environments = summary.status.bindings.map((b) => b.environment).sort();
    assert(JSON.stringify(environments) === JSON.stringify(["preview", "production", "staging"]), `bindings ${environments}`);
  });

  await step("errors_v1_none", async () => {
    const r = await call(scheduler, "ListDeploymentErrors", { project, deployment_id: d1 }, key);
    summary.errors.v1 = r.errors.map((e) => ({ kind: short(e.kind), count: Number(e.count), environment: e.environment }));
    assert(r.errors.length === 0, `a healthy deployment reports errors: ${JSON.stringify(summary.errors.v1)}`);
  });

  if (config.brokenImage) {
    await step("errors_broken_image_pull", async () => {
      await call(registry, "CreateEnvironment", { project, name: "ci-broken" }, key);
      const r = await call(
        registry,
        "Deploy",
        { project, image: config.brokenImage, environment: "ci-broken", min_replicas: 1, max_replicas: 1 },
        key,
      );
      const broken = r.deployment.id;
      summary.deployments.broken = broken;
      const listed = await eventually("an image_pull_error for the broken image", async () => {
        const e = await call(scheduler, "ListDeploymentErrors", { project, deployment_id: broken }, key);
        return e.errors.some((x) => isKind(x.kind, "image_pull_error")) ? e : { done: false, seen: e.errors };
      });
      summary.errors.broken = listed.errors.map((e) => ({ kind: short(e.kind), count: Number(e.count), environment: e.environment, message: e.message }));
      const pull = listed.errors.find((x) => isKind(x.kind, "image_pull_error"));
      assert(pull.environment === "ci-broken", `error environment ${pull.environment}`);
      assert(pull.message.includes(config.brokenImage.split("/")[0]), `message does not name the image: ${pull.message}`);
    }, { fatal: false });
  } else {
    summary.skipped.push({ name: "errors_broken_image_pull", reason: "BERTH_BROKEN_IMAGE not set" });
  }

  if (config.routerUrl) {
    await step("router_serves_v1_in_production", async () => {
      const answer = await eventually("the router serving v1 in production", async () => {
        const resp = await fetch(config.routerUrl + config.routerPath, {
          headers: { "X-Berth-Project": config.projectName, "X-Berth-Environment": "production" },
          signal: AbortSignal.timeout(15000),
        });
        await resp.arrayBuffer();
        const seen = { status: resp.status, deployment: resp.headers.get("x-berth-deployment") };
        return resp.status < 500 && seen.deployment === d1 ? seen : { done: false, seen };
      });
      summary.router = answer;
    });
  } else {
    summary.skipped.push({ name: "router_serves_v1_in_production", reason: "BERTH_ROUTER_URL not set" });
  }

  // -- bad input: every mistake a pipeline can make gets a precise status.
  const unknown = "dep_000000000000";
  await expectError(
    "unknown_deployment_registry",
    call(registry, "GetDeployment", { project, deployment_id: unknown }, key),
    "NOT_FOUND",
    new RegExp(unknown),
  );
  await expectError(
    "unknown_deployment_scheduler",
    call(scheduler, "GetDeploymentStatus", { project, deployment_id: unknown }, key),
    "NOT_FOUND",
    new RegExp(unknown),
  );
  await expectError(
    "promote_production_unconfirmed",
    call(registry, "Promote", { project, deployment_id: d2, target_environment: "production" }, key),
    "FAILED_PRECONDITION",
    /production/,
    { reason: "PROTECTED_ENVIRONMENT" },
  );
  await step(
    "production_unchanged_after_refusal",
    async () => {
      const r = await call(registry, "ListEnvironments", { project }, key);
      const production = r.environments.find((e) => e.name === "production");
      assert(production.deployment_id === d1, `production points at ${production.deployment_id}, expected ${d1}`);
    },
    { fatal: false },
  );
  await expectError(
    "deploy_empty_image",
    call(registry, "Deploy", { project, image: "", environment: "preview" }, key),
    "INVALID_ARGUMENT",
    /image/,
    { field: "image" },
  );
  const wrongKey = `berth_pk_${randomBytes(16).toString("hex")}`;
  await expectError("wrong_key_registry", call(registry, "ListEnvironments", { project }, wrongKey), "UNAUTHENTICATED", /./);
  await expectError("wrong_key_secrets", call(secrets, "ListSecrets", { project }, wrongKey), "UNAUTHENTICATED", /./);
  await expectError(
    "wrong_key_scheduler",
    call(scheduler, "GetDeploymentStatus", { project, deployment_id: d1 }, wrongKey),
    "UNAUTHENTICATED",
    /./,
  );
  await expectError("no_key_registry", call(registry, "ListEnvironments", { project }, ""), "UNAUTHENTICATED", /./);
  await expectError(
    "watch_bad_revision",
    watchEnvironments({ project, since_revision: "-1" }, key).opened,
    "INVALID_ARGUMENT",
    /since_revision/,
    { field: "since_revision" },
  );
  await expectError("watch_wrong_key", watchEnvironments({ project }, wrongKey).opened, "UNAUTHENTICATED", /./);
}

try {
  await pipeline();
} catch (err) {
  if (!(err instanceof Failed)) summary.failures.push(`unexpected: ${err.stack ?? err}`);
} finally {
  for (const stream of openWatches) stream.cancel();
  for (const client of [registry, secrets, scheduler]) client.close();
}
summary.ok = summary.failures.length === 0;
summary.elapsed_ms = Date.now() - started;
process.stdout.write(JSON.stringify(summary) + "\n");
for (const failure of summary.failures) process.stderr.write(`berth-client: FAILED ${failure}\n`);
process.exit(summary.ok ? 0 : 1);
