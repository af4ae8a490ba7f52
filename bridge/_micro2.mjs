import * as S from '@signalapp/libsignal-client';
import { RecordCache, CallRecords, CallSessionStore, CallIdentityStore, CallPreKeyStore, CallSignedPreKeyStore, CallKyberPreKeyStore } from './stores.mjs';

function party(name) {
  const durable = new Map();
  const cache = new RecordCache(async (k, key) => durable.get(k + ':' + key) ?? null);
  const identityKeyPair = S.IdentityKeyPair.generate();
  const local = { identityKeyPair, registrationId: 1234, address: S.ProtocolAddress.new(name, 1), trustPolicy: 'tofu', lastResortKyberIds: new Set() };
  return { name, durable, cache, local, address: local.address };
}
function stores(p) {
  const records = new CallRecords(p.cache);
  return { records, session: new CallSessionStore(records), identity: new CallIdentityStore(records, p.local), preKey: new CallPreKeyStore(records), signedPreKey: new CallSignedPreKeyStore(records), kyberPreKey: new CallKyberPreKeyStore(records, p.local) };
}
const a = party('alice'), b = party('bob');
const ec = S.PrivateKey.generate(), sp = S.PrivateKey.generate(), kem = S.KEMKeyPair.generate();
const ss = b.local.identityKeyPair.privateKey.sign(sp.getPublicKey().serialize());
const ks = b.local.identityKeyPair.privateKey.sign(kem.getPublicKey().serialize());
b.durable.set('prekey:1', S.PreKeyRecord.new(1, ec.getPublicKey(), ec).serialize());
b.durable.set('signed_prekey:1', S.SignedPreKeyRecord.new(1, 0, sp.getPublicKey(), sp, ss).serialize());
b.durable.set('kyber_prekey:1', S.KyberPreKeyRecord.new(1, 0, kem, ks).serialize());
const bundle = S.PreKeyBundle.new(1234, 1, 1, ec.getPublicKey(), 1, sp.getPublicKey(), ss, b.local.identityKeyPair.publicKey, 1, kem.getPublicKey(), ks);
let st = stores(a);
await S.processPreKeyBundle(bundle, b.address, a.address, st.session, st.identity); st.records.commit();
const payload = new Uint8Array(1024);
async function exch(s, r) {
  let x = stores(s);
  const m = await S.signalEncrypt(payload, r.address, s.address, x.session, x.identity);
  x.records.commit();
  x = stores(r);
  const bytes = m.serialize();
  if (m.type() === 3) await S.signalDecryptPreKey(S.PreKeySignalMessage.deserialize(bytes), s.address, r.address, x.session, x.identity, x.preKey, x.signedPreKey, x.kyberPreKey);
  else await S.signalDecrypt(S.SignalMessage.deserialize(bytes), s.address, r.address, x.session, x.identity);
  x.records.commit();
}
await exch(a, b); await exch(b, a);
for (let round = 0; round < 3; round++) {
  const t = performance.now(); let n = 0;
  while (performance.now() - t < 2000) { await (n % 2 ? exch(b, a) : exch(a, b)); n++; }
  console.log('my stores ops/s', (n / ((performance.now() - t) / 1000)).toFixed(0));
}
