// The fleet side of the library: OPA's own plugin manager, configured by OPA's
// configuration file, doing OPA's protocols for the engine — bundles pulled from a bundle
// server (download package: ETag, polling, long polling; bundle package: signature
// verification), status reports (status plugin), decision logs masked and dropped by the
// policy (decision_logs plugin) and uploaded in OPA's format from a disk spool (upload.go).
//
// A downloaded bundle is not activated here: it is handed to the engine (mcp_fleet_next),
// which validates it as it validates policy directories and answers with
// mcp_fleet_bundle_done; only then does the downloader go on, and the status plugin hear
// of the activation or the refusal.

package main

/*
#include <stdint.h>
#include <stdlib.h>
*/
import "C"

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"sort"
	"sync"
	"time"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/bundle"
	"github.com/open-policy-agent/opa/v1/download"
	"github.com/open-policy-agent/opa/v1/keys"
	"github.com/open-policy-agent/opa/v1/logging"
	"github.com/open-policy-agent/opa/v1/plugins"
	bundleplugin "github.com/open-policy-agent/opa/v1/plugins/bundle"
	"github.com/open-policy-agent/opa/v1/plugins/logs"
	"github.com/open-policy-agent/opa/v1/plugins/status"
	"github.com/open-policy-agent/opa/v1/storage"
	"github.com/open-policy-agent/opa/v1/storage/inmem"
)

// Status codes of the mcp_fleet_* calls; engine/policy/fleet.py has the same table.
const (
	fleetOK      = 0 // done; *out (when set) is the JSON answer
	fleetTimeout = 1 // mcp_fleet_next: nothing happened within the wait
	fleetStopped = 2 // no fleet is running (never started, or stopped)
	fleetError   = 3 // *out is the error message
)

// The options the engine starts the fleet with (beside OPA's configuration).
type fleetOptions struct {
	ID       string `json:"id"`        // this replica's id: labels.id in every report
	SpoolDir string `json:"spool_dir"` // where decisions wait for the collector
}

// An event for the engine: a bundle to validate and activate, a download that failed,
// or a line of the plugins' log.
type fleetEvent struct {
	Kind     string            `json:"kind"` // "bundle", "error", "log"
	ID       uint64            `json:"id,omitempty"`
	Name     string            `json:"name,omitempty"`
	Revision string            `json:"revision,omitempty"`
	ETag     string            `json:"etag,omitempty"`
	Size     int               `json:"size,omitempty"`
	Roots    []string          `json:"roots,omitempty"`
	Modules  map[string]string `json:"modules,omitempty"`
	Data     map[string]any    `json:"data,omitempty"`
	Level    string            `json:"level,omitempty"`
	Message  string            `json:"message,omitempty"`
}

// The engine's answer to a bundle event.
type bundleDone struct {
	ID       uint64   `json:"id"`
	OK       bool     `json:"ok"`
	Revision string   `json:"revision"`
	Errors   []string `json:"errors"`
}

type fleet struct {
	manager     *plugins.Manager
	downloaders map[string]*download.Downloader
	status      *status.Plugin
	logs        *logs.Plugin
	upload      *uploader

	events chan fleetEvent

	mu       sync.Mutex
	nextID   uint64
	waiting  map[uint64]chan bundleDone
	bundles  map[string]*bundleplugin.Status
	stopped  chan struct{}
	stopOnce sync.Once
}

var (
	fleetMu sync.Mutex
	current *fleet
)

// engineLogger hands the plugins' log lines to the engine's log (as "log" events), so
// they appear in the service's log with its format; debug lines are dropped.
type engineLogger struct {
	events chan fleetEvent
	fields map[string]any
}

func (l *engineLogger) send(level, format string, a ...any) {
	msg := fmt.Sprintf(format, a...)
	if name, ok := l.fields["name"]; ok {
		msg = fmt.Sprintf("%s (bundle %v)", msg, name)
	} else if plugin, ok := l.fields["plugin"]; ok {
		msg = fmt.Sprintf("%s (%v)", msg, plugin)
	}
	select {
	case l.events <- fleetEvent{Kind: "log", Level: level, Message: msg}:
	default: // the engine is not keeping up: a log line is not worth blocking a plugin
	}
}

func (l *engineLogger) Debug(string, ...any)     {}
func (l *engineLogger) Info(string, ...any)      {}
func (l *engineLogger) Warn(f string, a ...any)  { l.send("warning", f, a...) }
func (l *engineLogger) Error(f string, a ...any) { l.send("error", f, a...) }
func (l *engineLogger) SetLevel(logging.Level)   {}
func (l *engineLogger) GetLevel() logging.Level  { return logging.Info }
func (l *engineLogger) WithFields(f map[string]any) logging.Logger {
	merged := map[string]any{}
	for k, v := range l.fields {
		merged[k] = v
	}
	for k, v := range f {
		merged[k] = v
	}
	return &engineLogger{events: l.events, fields: merged}
}

// startFleet builds the manager and its plugins from OPA's configuration and starts them.
func startFleet(raw []byte, opts fleetOptions) (*fleet, error) {
	events := make(chan fleetEvent, 1024)
	logger := &engineLogger{events: events}
	store := inmem.New()
	manager, err := plugins.New(raw, opts.ID, store,
		plugins.Logger(logger), plugins.ConsoleLogger(logger),
		plugins.WithParserOptions(ast.ParserOptions{RegoVersion: ast.RegoV1}))
	if err != nil {
		return nil, err
	}
	f := &fleet{
		manager:     manager,
		downloaders: map[string]*download.Downloader{},
		events:      events,
		waiting:     map[uint64]chan bundleDone{},
		bundles:     map[string]*bundleplugin.Status{},
		stopped:     make(chan struct{}),
	}
	cfg := manager.GetConfig()
	var sources map[string]*bundleplugin.Source
	if len(cfg.Bundles) > 0 {
		parsed, err := bundleplugin.NewConfigBuilder().WithBytes(cfg.Bundles).
			WithServices(manager.Services()).WithKeyConfigs(manager.PublicKeys()).Parse()
		if err != nil {
			return nil, fmt.Errorf("bundles: %w", err)
		}
		sources = parsed.Bundles
	}
	if len(cfg.DecisionLogs) > 0 {
		upload, err := newUploader(cfg.DecisionLogs, manager, opts.SpoolDir)
		if err != nil {
			return nil, fmt.Errorf("decision_logs: %w", err)
		}
		f.upload = upload
		manager.Register(spoolPluginName, upload)
		logsConfig, err := logs.NewConfigBuilder().WithBytes(upload.pluginConfig).
			WithServices(manager.Services()).WithPlugins(manager.Plugins()).Parse()
		if err != nil {
			return nil, fmt.Errorf("decision_logs: %w", err)
		}
		f.logs = logs.New(logsConfig, manager)
		manager.Register(logs.Name, f.logs)
	}
	if len(cfg.Status) > 0 {
		statusConfig, err := status.NewConfigBuilder().WithBytes(cfg.Status).
			WithServices(manager.Services()).WithPlugins(manager.Plugins()).Parse()
		if err != nil {
			return nil, fmt.Errorf("status: %w", err)
		}
		f.status = status.New(statusConfig, manager)
		manager.Register(status.Name, f.status)
	}
	ctx := context.Background()
	if err := manager.Init(ctx); err != nil {
		return nil, err
	}
	if err := manager.Start(ctx); err != nil {
		return nil, err
	}
	names := make([]string, 0, len(sources))
	for name := range sources {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		source := sources[name]
		f.bundles[name] = &bundleplugin.Status{Name: name}
		d := download.New(source.Config, manager.Client(source.Service), source.Resource).
			WithCallback(f.downloaded(name)).
			WithBundleVerificationConfig(source.Signing).
			WithSizeLimitBytes(source.SizeLimitBytes).
			WithBundleName(name).
			WithBundleParserOpts(ast.ParserOptions{RegoVersion: ast.RegoV1}).
			WithLogAttrs(map[string]any{"name": name})
		f.downloaders[name] = d
		d.Start(ctx)
	}
	f.reportBundles()
	return f, nil
}

// downloaded is a downloader's callback: a new bundle waits for the engine's verdict.
func (f *fleet) downloaded(name string) func(context.Context, download.Update) error {
	return func(ctx context.Context, u download.Update) error {
		f.mu.Lock()
		st := f.bundles[name]
		st.SetRequest()
		switch {
		case u.Error != nil:
			st.SetError(u.Error)
			var httpErr download.HTTPError
			if errors.As(u.Error, &httpErr) {
				st.HTTPCode = json.Number(fmt.Sprint(httpErr.StatusCode))
			}
		case u.Bundle == nil: // 304: nothing new
			st.LastSuccessfulRequest = st.LastRequest
		default:
			st.SetDownloadSuccess()
			st.SetBundleSize(u.Size)
		}
		f.mu.Unlock()
		if u.Error != nil {
			// Unreachable, or an HTTP error: a download error. Anything else came with
			// the bundle (a signature that does not verify, a digest that does not
			// match, an archive that does not parse): the bundle is refused.
			kind := "refused"
			var httpErr download.HTTPError
			var netErr *url.Error
			if errors.As(u.Error, &httpErr) || errors.As(u.Error, &netErr) {
				kind = "error"
			}
			f.emit(fleetEvent{Kind: kind, Name: name, Message: u.Error.Error()})
			f.reportBundles()
			return nil
		}
		if u.Bundle == nil {
			f.reportBundles()
			return nil
		}
		done, err := f.offer(name, u)
		f.mu.Lock()
		if err != nil {
			st.SetError(err)
		} else if !done.OK {
			st.SetError(errors.New(firstOr(done.Errors, "refused by the engine")))
			st.Errors = nil
			for _, e := range done.Errors {
				st.Errors = append(st.Errors, errors.New(e))
			}
		} else {
			st.SetActivateSuccess(done.Revision)
		}
		f.mu.Unlock()
		f.reportBundles()
		if err != nil {
			// Refused before the engine saw it (a delta bundle): said as every refusal is.
			f.emit(fleetEvent{Kind: "refused", Name: name, Message: err.Error()})
			return err
		}
		if !done.OK {
			// Refused: the running revision keeps serving; the downloader keeps the new
			// ETag, so the same bundle is not fetched again until it changes.
			return errors.New(firstOr(done.Errors, "refused by the engine"))
		}
		return nil
	}
}

func firstOr(items []string, fallback string) string {
	if len(items) > 0 {
		return items[0]
	}
	return fallback
}

// offer hands the bundle to the engine and waits for its verdict.
func (f *fleet) offer(name string, u download.Update) (bundleDone, error) {
	b := u.Bundle
	if b.Type() == bundle.DeltaBundleType {
		return bundleDone{}, errors.New("delta bundles are not supported: serve a full bundle")
	}
	modules := make(map[string]string, len(b.Modules))
	for _, m := range b.Modules {
		path := m.Path
		if path == "" {
			path = m.URL
		}
		modules[path] = string(m.Raw)
	}
	var roots []string
	if b.Manifest.Roots != nil {
		roots = *b.Manifest.Roots
	}
	reply := make(chan bundleDone, 1)
	f.mu.Lock()
	f.nextID++
	id := f.nextID
	f.waiting[id] = reply
	f.mu.Unlock()
	defer func() {
		f.mu.Lock()
		delete(f.waiting, id)
		f.mu.Unlock()
	}()
	event := fleetEvent{
		Kind: "bundle", ID: id, Name: name, Revision: b.Manifest.Revision, ETag: u.ETag,
		Size: u.Size, Roots: roots, Modules: modules, Data: b.Data,
	}
	select {
	case f.events <- event:
	case <-f.stopped:
		return bundleDone{}, errors.New("stopping")
	}
	select {
	case done := <-reply:
		return done, nil
	case <-f.stopped:
		return bundleDone{}, errors.New("stopping")
	}
}

func (f *fleet) emit(e fleetEvent) {
	select {
	case f.events <- e:
	case <-f.stopped:
	default:
	}
}

// reportBundles tells the status plugin how every bundle stands.
func (f *fleet) reportBundles() {
	if f.status == nil {
		return
	}
	f.mu.Lock()
	snapshot := make(map[string]*bundleplugin.Status, len(f.bundles))
	for name, st := range f.bundles {
		c := *st
		snapshot[name] = &c
	}
	f.mu.Unlock()
	f.status.BulkUpdateBundleStatus(snapshot)
}

func (f *fleet) stop(timeout time.Duration) {
	f.stopOnce.Do(func() {
		close(f.stopped)
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		for _, d := range f.downloaders {
			d.Stop(ctx)
		}
		// The manager stops every plugin: the spool uploads what it can in the time
		// left (what it cannot stays on disk for the next start), status sends a last
		// report.
		f.manager.Stop(ctx)
	})
}

// useCompiler makes a compiled policy the one the decision_logs plugin masks and drops
// with (data.system.log.mask, data.system.log.drop), with its data.
func (f *fleet) useCompiler(p *policy) error {
	ctx := context.Background()
	value, err := storage.ReadOne(ctx, p.store, storage.RootPath)
	if err != nil {
		return err
	}
	if v, ok := value.(ast.Value); ok { // the policy's store keeps AST values
		if value, err = ast.JSON(v); err != nil {
			return err
		}
	}
	compiler := p.compiler
	if f.upload != nil {
		f.upload.masking.Store(masks(compiler, f.upload))
	}
	params := storage.WriteParams
	params.Context = storage.NewContext()
	plugins.SetCompilerOnContext(params.Context, compiler)
	txn, err := f.manager.Store.NewTransaction(ctx, params)
	if err != nil {
		return err
	}
	if err := f.manager.Store.Write(ctx, txn, storage.ReplaceOp, storage.RootPath, value); err != nil {
		f.manager.Store.Abort(ctx, txn)
		return err
	}
	return f.manager.Store.Commit(ctx, txn)
}

func fleetAnswer(out **C.char, outlen *C.size_t, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		b, _ = json.Marshal(map[string]string{"error": err.Error()})
	}
	reply(out, outlen, b)
}

func running() *fleet {
	fleetMu.Lock()
	defer fleetMu.Unlock()
	return current
}

// mcp_fleet_start starts the fleet from OPA's configuration (JSON) and the options.
//
//export mcp_fleet_start
func mcp_fleet_start(config *C.char, n C.size_t, options *C.char, m C.size_t, out **C.char, outlen *C.size_t) (status C.int) {
	*out, *outlen = nil, 0
	defer func() {
		if r := recover(); r != nil {
			reply(out, outlen, fmt.Appendf(nil, "panic: %v", r))
			status = fleetError
		}
	}()
	var opts fleetOptions
	if err := json.Unmarshal(view(options, m), &opts); err != nil {
		reply(out, outlen, []byte("options: "+err.Error()))
		return fleetError
	}
	fleetMu.Lock()
	defer fleetMu.Unlock()
	if current != nil {
		reply(out, outlen, []byte("a fleet is already running in this process"))
		return fleetError
	}
	f, err := startFleet(view(config, n), opts)
	if err != nil {
		reply(out, outlen, []byte(err.Error()))
		return fleetError
	}
	current = f
	return fleetOK
}

// mcp_fleet_next waits up to waitMs for the next event and answers it as JSON.
//
//export mcp_fleet_next
func mcp_fleet_next(waitMs C.int, out **C.char, outlen *C.size_t) C.int {
	*out, *outlen = nil, 0
	f := running()
	if f == nil {
		return fleetStopped
	}
	timer := time.NewTimer(time.Duration(waitMs) * time.Millisecond)
	defer timer.Stop()
	select {
	case e := <-f.events:
		fleetAnswer(out, outlen, e)
		return fleetOK
	case <-f.stopped:
		return fleetStopped
	case <-timer.C:
		return fleetTimeout
	}
}

// mcp_fleet_bundle_done is the engine's verdict on a bundle event.
//
//export mcp_fleet_bundle_done
func mcp_fleet_bundle_done(doneJSON *C.char, n C.size_t) C.int {
	f := running()
	if f == nil {
		return fleetStopped
	}
	var done bundleDone
	if err := json.Unmarshal(view(doneJSON, n), &done); err != nil {
		return fleetError
	}
	f.mu.Lock()
	reply := f.waiting[done.ID]
	f.mu.Unlock()
	if reply == nil {
		return fleetError
	}
	reply <- done
	return fleetOK
}

// mcp_fleet_use makes the prepared policy `handle` the one decision logs are masked with.
//
//export mcp_fleet_use
func mcp_fleet_use(handle C.uintptr_t, out **C.char, outlen *C.size_t) C.int {
	*out, *outlen = nil, 0
	f := running()
	if f == nil {
		return fleetStopped
	}
	mu.RLock()
	p := policies[uintptr(handle)]
	mu.RUnlock()
	if p == nil {
		reply(out, outlen, []byte("no such policy handle"))
		return fleetError
	}
	if err := f.useCompiler(p); err != nil {
		reply(out, outlen, []byte(err.Error()))
		return fleetError
	}
	return fleetOK
}

// mcp_fleet_stats answers what the fleet's parts have done, as JSON.
//
//export mcp_fleet_stats
func mcp_fleet_stats(out **C.char, outlen *C.size_t) C.int {
	*out, *outlen = nil, 0
	f := running()
	if f == nil {
		return fleetStopped
	}
	f.mu.Lock()
	bundles := map[string]any{}
	for name, st := range f.bundles {
		bundles[name] = map[string]any{
			"active_revision":            st.ActiveRevision,
			"last_successful_activation": st.LastSuccessfulActivation,
			"last_successful_download":   st.LastSuccessfulDownload,
			"last_request":               st.LastRequest,
			"code":                       st.Code,
			"message":                    st.Message,
			"http_code":                  st.HTTPCode,
		}
	}
	f.mu.Unlock()
	stats := map[string]any{"bundles": bundles, "labels": f.manager.Labels()}
	if f.upload != nil {
		stats["decision_logs"] = f.upload.stats()
	}
	fleetAnswer(out, outlen, stats)
	return fleetOK
}

// mcp_fleet_stop stops the fleet, leaving up to timeoutMs for the last uploads.
//
//export mcp_fleet_stop
func mcp_fleet_stop(timeoutMs C.int) {
	fleetMu.Lock()
	f := current
	current = nil
	fleetMu.Unlock()
	if f != nil {
		f.stop(time.Duration(timeoutMs) * time.Millisecond)
	}
}

// The result of reading a bundle file: its contents as the engine loads them.
type bundleFile struct {
	Revision string            `json:"revision"`
	Roots    []string          `json:"roots,omitempty"`
	Modules  map[string]string `json:"modules"`
	Data     map[string]any    `json:"data"`
	Signed   bool              `json:"signed"`
}

// The verification the engine asks of a bundle file (as `opa run --verification-key`).
type fileVerification struct {
	Key       string `json:"key"` // a PEM public key, or an HMAC secret
	KeyID     string `json:"keyid"`
	Algorithm string `json:"algorithm"`
	Scope     string `json:"scope"`
}

func readBundleFile(path string, v *fileVerification) (*bundleFile, error) {
	file, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer file.Close()
	reader := bundle.NewReader(file).WithRegoVersion(ast.RegoV1).WithProcessAnnotations(true)
	if v != nil {
		keyID := v.KeyID
		if keyID == "" {
			keyID = "default"
		}
		alg := v.Algorithm
		if alg == "" {
			alg = "RS256"
		}
		keyConfig, err := keys.NewKeyConfig(v.Key, alg, v.Scope)
		if err != nil {
			return nil, err
		}
		reader = reader.WithBundleVerificationConfig(bundle.NewVerificationConfig(
			map[string]*bundle.KeyConfig{keyID: keyConfig}, keyID, v.Scope, nil))
	}
	b, err := reader.Read()
	if err != nil {
		return nil, err
	}
	if b.Type() == bundle.DeltaBundleType {
		return nil, errors.New("a delta bundle cannot be loaded from a file")
	}
	out := &bundleFile{
		Revision: b.Manifest.Revision, Modules: map[string]string{}, Data: b.Data,
		Signed: len(b.Signatures.Signatures) > 0,
	}
	if b.Manifest.Roots != nil {
		out.Roots = *b.Manifest.Roots
	}
	for _, m := range b.Modules {
		path := m.Path
		if path == "" {
			path = m.URL
		}
		out.Modules[path] = string(m.Raw)
	}
	return out, nil
}

// mcp_bundle_read reads (and, with a verification, verifies) the bundle file at path.
//
//export mcp_bundle_read
func mcp_bundle_read(path *C.char, n C.size_t, verification *C.char, m C.size_t, out **C.char, outlen *C.size_t) (status C.int) {
	*out, *outlen = nil, 0
	defer func() {
		if r := recover(); r != nil {
			reply(out, outlen, fmt.Appendf(nil, "panic: %v", r))
			status = fleetError
		}
	}()
	var v *fileVerification
	if raw := view(verification, m); len(raw) > 0 {
		v = &fileVerification{}
		if err := json.Unmarshal(raw, v); err != nil {
			reply(out, outlen, []byte("verification: "+err.Error()))
			return fleetError
		}
	}
	b, err := readBundleFile(string(view(path, n)), v)
	if err != nil {
		reply(out, outlen, []byte(err.Error()))
		return fleetError
	}
	fleetAnswer(out, outlen, b)
	return fleetOK
}
