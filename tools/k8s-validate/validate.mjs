#!/usr/bin/env node
// Validates Kubernetes custom resources offline against their CRDs' OpenAPI v3 schemas, with the
// kubernetes-models packages (generated from KEDA's and the Prometheus Operator's CRDs; each
// model's validate() checks types, required fields, enums and unknown fields where the schema
// closes them). Core kinds are validated by tests/ops/test_k8s.py with kubernetes-validate.
//
// stdin:  [{"name": "...", "doc": {apiVersion, kind, metadata, spec, ...}}, ...]
// stdout: [{"name": "...", "kind": "...", "ok": true|false, "error": "..."}]
// A kind this tool has no schema for is an error ("no schema"), never a silent pass.
// Exit status: 0 when validation ran (whatever the results), 2 on bad input.

import { readFileSync } from 'node:fs';
import { ScaledObject } from '@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject';
import { TriggerAuthentication } from '@kubernetes-models/keda/keda.sh/v1alpha1/TriggerAuthentication';
import { ServiceMonitor } from '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor';
import { PodMonitor } from '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor';
import { PrometheusRule } from '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule';

const MODELS = new Map(
  [ScaledObject, TriggerAuthentication, ServiceMonitor, PodMonitor, PrometheusRule].map((m) => [`${m.apiVersion}/${m.kind}`, m]),
);

let items;
try {
  items = JSON.parse(readFileSync(0, 'utf8'));
  if (!Array.isArray(items)) throw new Error('expected a JSON list');
} catch (err) {
  process.stderr.write(`validate.mjs: bad input: ${err.message}\n`);
  process.exit(2);
}

const out = items.map(({ name, doc }) => {
  const kind = `${doc?.apiVersion}/${doc?.kind}`;
  const Model = MODELS.get(kind);
  if (!Model) return { name, kind, ok: false, error: `no schema for ${kind}` };
  try {
    new Model(doc).validate();
    return { name, kind, ok: true };
  } catch (err) {
    return { name, kind, ok: false, error: String(err?.message ?? err) };
  }
});
process.stdout.write(JSON.stringify(out) + '\n');
