// One SQLite file, two tables with their own small interfaces.
import { openDb } from './db.js';
import { RecordStore, type RecordStoreOptions } from './records.js';
import { TenantStore } from './tenants.js';

export class Store {
  readonly records: RecordStore;
  readonly tenants: TenantStore;

  constructor(path: string, opts: RecordStoreOptions = {}) {
    const db = openDb(path);
    this.records = new RecordStore(db, opts);
    this.tenants = new TenantStore(db);
  }

  close(): void {
    this.records.close();
  }
}
