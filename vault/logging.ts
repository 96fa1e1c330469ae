// Logging and auditing, shared by the daemon and the offline admin commands: the
// vault's pino logger (redaction, a tap that sees every line at info or above),
// the tap that turns security events into audit-log lines and metrics, and
// opening the audit log with its metrics wired in. Kept apart from daemon.ts so
// bkv-admin and the ceremony do not import the daemon to log.
import { join } from 'node:path';
import pino, { type Logger, type StreamEntry } from 'pino';
import type { Config } from './config.js';
import type { Metrics } from './metrics.js';
import { AuditLog } from './audit/log.js';
import { auditEventOf, eventOf } from './audit/events.js';

const LEVELS = { trace: 10, debug: 20, info: 30, warn: 40, error: 50, fatal: 60 } as const;

/**
 * The vault's logger. With a `tap`, every line at info or above is also handed
 * to it (audit log and metrics), whatever the configured level, so turning
 * logging down never turns auditing off.
 */
export function makeLogger(c: Config, tap?: (line: string) => void): Logger {
  const opts = {
    base: { svc: 'bkv-vault' },
    // Defence in depth: nothing secret is ever logged on purpose, but should a
    // future change pass a request object, these paths are blanked.
    redact: { paths: ['req.headers.authorization', '*.password', '*.authKey', '*.pin', '*.token', '*.envelope', '*.secret'], censor: '[redacted]' },
  };
  if (!tap) return pino({ ...opts, level: c.log.level });
  const streams: StreamEntry[] = [];
  if (c.log.level !== 'silent') streams.push({ level: c.log.level, stream: pino.destination({ dest: 1, sync: true }) });
  streams.push({ level: 'info', stream: { write: tap } });
  const level = c.log.level !== 'silent' && LEVELS[c.log.level] < LEVELS.info ? c.log.level : 'info';
  return pino({ ...opts, level }, pino.multistream(streams));
}

/**
 * The log tap: security events into the audit log, event counts into metrics. The offline
 * tools (bkv-admin, the ceremony) pass no metrics: nothing would scrape them, and prom-client
 * is ~40 modules of start-up.
 */
export function logTap(metrics: Metrics | undefined, audit?: AuditLog): (line: string) => void {
  return (line) => {
    const ev = eventOf(line);
    if (!ev) return;
    metrics?.onLogEvent(ev);
    if (!audit) return;
    const a = auditEventOf(line);
    if (a) {
      audit.append(a.event, a.fields, a.time);
      metrics?.securityEvents.inc({ event: a.event });
    }
  };
}

/** Open the audit log with metrics (if any) wired in; errors are logged through `log()` once it exists. */
export function openAudit(c: Config, metrics: Metrics | undefined, log: () => Logger | undefined): AuditLog {
  return AuditLog.open(c.audit.file ?? join(c.dataDir, 'audit.log'), {
    checkpointEvery: c.audit.checkpointEvery,
    checkpointSec: c.audit.checkpointSec,
    onAppend: () => metrics?.auditEvents.inc(),
    onCheckpoint: () => metrics?.auditCheckpoints.inc(),
    // "audit.error" is not an audited event, so this cannot loop back into the audit log.
    onError: (what, e) => {
      metrics?.auditErrors.inc();
      log()?.error({ event: 'audit.error', what, err: (e as Error)?.message }, 'audit log write failed');
    },
  });
}
