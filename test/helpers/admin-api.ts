// The daemon's admin listener as bkv-admin uses it: the address from
// <data>/admin.json, the bearer from <data>/admin-token (written at every start).
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { RunningDaemon } from './daemon.js';

export interface AdminApi {
  post<T = Record<string, unknown>>(path: string, body: object): Promise<{ status: number; body: T }>;
  /** Add a tenant and mint a token for it (ttl 600 s unless given). */
  tenant(name: string, ttlSec?: number): Promise<{ version: number; token: string }>;
}

export async function adminApi(d: RunningDaemon): Promise<AdminApi> {
  let info: { url: string } | undefined;
  for (let i = 0; i < 200 && !info; i++) {
    try {
      info = JSON.parse(readFileSync(join(d.dataDir, 'admin.json'), 'utf8')) as { url: string };
    } catch {
      await new Promise((r) => setTimeout(r, 25));
    }
  }
  if (!info) throw new Error('the daemon published no admin.json');
  const url = info.url;
  const token = readFileSync(join(d.dataDir, 'admin-token'), 'utf8').trim();
  const api: AdminApi = {
    async post<T>(path: string, body: object) {
      const res = await fetch(url + path, {
        method: 'POST',
        headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
        body: JSON.stringify(body),
      });
      return { status: res.status, body: (await res.json()) as T };
    },
    async tenant(name: string, ttlSec = 600) {
      const add = await api.post<{ version: number }>('/admin/tenants', { name });
      if (add.status !== 200) throw new Error(`tenant add ${name}: HTTP ${add.status}`);
      const tok = await api.post<{ token: string; version: number }>('/admin/tenants/token', { name, ttlSec });
      if (tok.status !== 200) throw new Error(`tenant token ${name}: HTTP ${tok.status}`);
      return { version: tok.body.version, token: tok.body.token };
    },
  };
  return api;
}
