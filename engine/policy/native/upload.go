// Decisions to a collector, in OPA's decision-log format, through a spool on disk.
//
// The engine hands each decision to OPA's decision_logs plugin (mcp_fleet_log), which
// drops and masks it by the policy (data.system.log.drop / mask) and builds OPA's event;
// the plugin then gives the event to this one (configured as its `plugin`), which appends
// it to a spool of segment files. An uploader sends the spool, oldest first, as the
// plugin would: gzip-compressed JSON arrays of at most upload_size_limit_bytes, POSTed to
// the configured service and resource through OPA's REST client (its credentials, TLS),
// retried with OPA's backoff. A cursor file says how far the collector has acknowledged,
// so a restart resends nothing it took and loses nothing it did not; past the spool's
// cap (reporting.buffer_size_limit_bytes) the oldest segment goes, counted.

package main

/*
#include <stdint.h>
#include <stdlib.h>
*/
import "C"

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/logging"
	"github.com/open-policy-agent/opa/v1/plugins"
	"github.com/open-policy-agent/opa/v1/plugins/logs"
	"github.com/open-policy-agent/opa/v1/plugins/rest"
	"github.com/open-policy-agent/opa/v1/server"
	"github.com/open-policy-agent/opa/v1/util"
)

const (
	spoolPluginName = "mcp_policy_spool"
	// Bytes of a spool segment before the next one is started (at most a quarter of the
	// cap, so the cap drops a little at a time).
	maxSegmentBytes = int64(1 << 20)
	// The spool's cap when reporting.buffer_size_limit_bytes is not set.
	defaultSpoolCap = int64(256 << 20)
	minRetryDelay   = 100 * time.Millisecond
	cursorFile      = "cursor.json"
)

// The user's decision_logs section: OPA's keys this engine honours.
type uploadConfig struct {
	Service       string  `json:"service"`
	Resource      *string `json:"resource"`
	PartitionName string  `json:"partition_name"`
	MaskDecision  *string `json:"mask_decision"`
	DropDecision  *string `json:"drop_decision"`
	Reporting     struct {
		BufferSizeLimitBytes *int64               `json:"buffer_size_limit_bytes"`
		UploadSizeLimitBytes *int64               `json:"upload_size_limit_bytes"`
		MinDelaySeconds      *int64               `json:"min_delay_seconds"`
		MaxDelaySeconds      *int64               `json:"max_delay_seconds"`
		Trigger              *plugins.TriggerMode `json:"trigger"`
	} `json:"reporting"`
}

type cursor struct {
	Segment uint64 `json:"segment"`
	Offset  int64  `json:"offset"`
}

type uploader struct {
	client       rest.Client
	resource     string
	uploadLimit  int64
	spoolCap     int64
	segmentBytes int64
	minDelay     time.Duration
	maxDelay     time.Duration
	trigger      plugins.TriggerMode
	pluginConfig []byte // the decision_logs plugin's own configuration
	maskPath     string // where the policy's mask and drop rules would be
	dropPath     string
	masking      atomic.Bool // the policy has them: events go through the plugin
	dir          string
	logger       logging.Logger

	mu       sync.Mutex
	segments map[uint64]int64 // segment -> bytes written
	lines    map[uint64]int64 // segment -> events written (this run; scanned at start)
	writing  uint64           // the segment appended to
	file     *os.File
	at       cursor // what the collector has taken
	queued   int64
	sent     int64
	dropped  int64
	failures int64
	failing  bool
	lastErr  string
	lastOK   time.Time

	wake    chan struct{}
	stopReq chan context.Context
	stopped chan struct{}
}

func newUploader(raw []byte, manager *plugins.Manager, dir string) (*uploader, error) {
	var cfg uploadConfig
	if err := util.Unmarshal(raw, &cfg); err != nil {
		return nil, err
	}
	// OPA's own checks of the section (service named, delays, trigger), as it would run them.
	checked, err := logs.NewConfigBuilder().WithBytes(raw).WithServices(manager.Services()).
		WithPlugins([]string{}).Parse()
	if err != nil {
		return nil, err
	}
	if checked.Service == "" {
		return nil, errors.New("no service to upload to: name one in decision_logs.service")
	}
	if dir == "" {
		return nil, errors.New("no spool directory")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	resource := *checked.Resource
	internal := map[string]any{"plugin": spoolPluginName}
	if cfg.MaskDecision != nil {
		internal["mask_decision"] = *cfg.MaskDecision
	}
	if cfg.DropDecision != nil {
		internal["drop_decision"] = *cfg.DropDecision
	}
	pluginConfig, _ := json.Marshal(internal)
	u := &uploader{
		client:       manager.Client(checked.Service),
		resource:     resource,
		uploadLimit:  *checked.Reporting.UploadSizeLimitBytes,
		spoolCap:     defaultSpoolCap,
		minDelay:     time.Duration(*checked.Reporting.MinDelaySeconds),
		maxDelay:     time.Duration(*checked.Reporting.MaxDelaySeconds),
		trigger:      *checked.Reporting.Trigger,
		pluginConfig: pluginConfig,
		maskPath:     "/system/log/mask",
		dropPath:     "/system/log/drop",
		dir:          dir,
		logger:       manager.Logger(),
		segments:     map[uint64]int64{},
		lines:        map[uint64]int64{},
		wake:         make(chan struct{}, 1),
		stopReq:      make(chan context.Context),
		stopped:      make(chan struct{}),
	}
	if cfg.MaskDecision != nil {
		u.maskPath = *cfg.MaskDecision
	}
	if cfg.DropDecision != nil {
		u.dropPath = *cfg.DropDecision
	}
	if cfg.Reporting.BufferSizeLimitBytes != nil && *cfg.Reporting.BufferSizeLimitBytes > 0 {
		u.spoolCap = *cfg.Reporting.BufferSizeLimitBytes
	}
	u.segmentBytes = max(1, min(maxSegmentBytes, u.spoolCap/4))
	if err := u.open(); err != nil {
		return nil, err
	}
	return u, nil
}

func (u *uploader) segmentPath(seq uint64) string {
	return filepath.Join(u.dir, fmt.Sprintf("%020d.jsonl", seq))
}

// open reads the spool left by an earlier run: its segments, the cursor, what is queued.
func (u *uploader) open() error {
	entries, err := os.ReadDir(u.dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		name := e.Name()
		if !strings.HasSuffix(name, ".jsonl") {
			continue
		}
		seq, err := strconv.ParseUint(strings.TrimSuffix(name, ".jsonl"), 10, 64)
		if err != nil {
			continue
		}
		info, err := e.Info()
		if err != nil {
			return err
		}
		u.segments[seq] = info.Size()
	}
	if raw, err := os.ReadFile(filepath.Join(u.dir, cursorFile)); err == nil {
		if err := json.Unmarshal(raw, &u.at); err != nil {
			return fmt.Errorf("%s: %w", filepath.Join(u.dir, cursorFile), err)
		}
	}
	seqs := u.ordered()
	if len(seqs) > 0 && u.at.Segment < seqs[0] {
		u.at = cursor{Segment: seqs[0]}
	}
	for _, seq := range seqs {
		from := int64(0)
		if seq < u.at.Segment {
			continue
		}
		if seq == u.at.Segment {
			from = u.at.Offset
		}
		n, err := countLines(u.segmentPath(seq), from)
		if err != nil {
			return err
		}
		u.lines[seq] = n
		u.queued += n
	}
	u.writing = 1
	if len(seqs) > 0 {
		u.writing = seqs[len(seqs)-1] + 1 // never append to a file a crash may have cut
	}
	if u.at.Segment == 0 {
		u.at = cursor{Segment: u.writing}
	}
	return nil
}

func countLines(path string, from int64) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	if _, err := f.Seek(from, io.SeekStart); err != nil {
		return 0, err
	}
	var n int64
	r := bufio.NewReaderSize(f, 1<<16)
	for {
		line, err := r.ReadBytes('\n')
		if len(line) > 0 && line[len(line)-1] == '\n' {
			n++
		}
		if err != nil {
			return n, nil
		}
	}
}

func (u *uploader) ordered() []uint64 {
	seqs := make([]uint64, 0, len(u.segments))
	for seq := range u.segments {
		seqs = append(seqs, seq)
	}
	sort.Slice(seqs, func(i, j int) bool { return seqs[i] < seqs[j] })
	return seqs
}

// Start and Stop are the plugin manager's: the uploader runs while the manager does.
func (u *uploader) Start(context.Context) error {
	go u.loop()
	return nil
}

func (u *uploader) Stop(ctx context.Context) {
	select {
	case u.stopReq <- ctx:
		<-u.stopped
	case <-u.stopped:
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.file != nil {
		_ = u.file.Sync()
		_ = u.file.Close()
		u.file = nil
	}
}

func (u *uploader) Reconfigure(context.Context, any) {}

type eventMetricsKey struct{}

// Log is the decision_logs plugin's hand-off: the event, masked, onto the spool.
func (u *uploader) Log(ctx context.Context, event logs.EventV1) error {
	if m, ok := ctx.Value(eventMetricsKey{}).(map[string]any); ok && len(m) > 0 {
		event.Metrics = m
	}
	line, err := json.Marshal(event)
	if err != nil {
		return err
	}
	line = append(line, '\n')
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.file == nil || u.segments[u.writing] >= u.segmentBytes {
		if err := u.roll(); err != nil {
			return err
		}
	}
	if _, err := u.file.Write(line); err != nil {
		return err
	}
	u.segments[u.writing] += int64(len(line))
	u.lines[u.writing]++
	u.queued++
	u.capSpool()
	if u.trigger == plugins.TriggerImmediate {
		select {
		case u.wake <- struct{}{}:
		default:
		}
	}
	return nil
}

// roll closes the segment being written and starts the next one.
func (u *uploader) roll() error {
	if u.file != nil {
		_ = u.file.Sync()
		_ = u.file.Close()
		u.file = nil
		u.writing++
	}
	f, err := os.OpenFile(u.segmentPath(u.writing), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	u.file = f
	if _, ok := u.segments[u.writing]; !ok {
		u.segments[u.writing] = 0
	}
	return nil
}

// capSpool drops the oldest segments while the spool is over its cap (lock held).
func (u *uploader) capSpool() {
	for {
		var total int64
		for _, size := range u.segments {
			total += size
		}
		total -= u.at.Offset
		seqs := u.ordered()
		if total <= u.spoolCap || len(seqs) < 2 {
			return
		}
		oldest := seqs[0]
		u.logger.Warn("decision logs: the spool is past its cap of %d bytes (buffer_size_limit_bytes): "+
			"the %d oldest decisions not uploaded were dropped", u.spoolCap, u.lines[oldest])
		u.dropped += u.lines[oldest]
		u.queued -= u.lines[oldest]
		delete(u.segments, oldest)
		delete(u.lines, oldest)
		_ = os.Remove(u.segmentPath(oldest))
		u.at = cursor{Segment: seqs[1]}
		u.saveCursor()
	}
}

func (u *uploader) saveCursor() {
	raw, _ := json.Marshal(u.at)
	tmp := filepath.Join(u.dir, cursorFile+".tmp")
	if err := os.WriteFile(tmp, raw, 0o600); err == nil {
		_ = os.Rename(tmp, filepath.Join(u.dir, cursorFile))
	}
}

// A chunk read from the spool: events to send and where the cursor goes when they are.
type chunk struct {
	events [][]byte
	start  cursor
	next   cursor
	done   []uint64         // segments wholly sent once the chunk is
	counts map[uint64]int64 // events of the chunk by segment
}

// readChunk reads whole events from the cursor on, up to about what fits in one upload.
func (u *uploader) readChunk() (*chunk, error) {
	u.mu.Lock()
	at := u.at
	seqs := u.ordered()
	writing := u.writing
	u.mu.Unlock()
	budget := u.uploadLimit * 8 // JSON compresses about tenfold; trimmed after compressing
	c := &chunk{start: at, next: at, counts: map[uint64]int64{}}
	var size int64
	for _, seq := range seqs {
		if seq < at.Segment {
			continue
		}
		from := int64(0)
		if seq == at.Segment {
			from = at.Offset
		}
		f, err := os.Open(u.segmentPath(seq))
		if err != nil {
			return nil, err
		}
		if _, err := f.Seek(from, io.SeekStart); err != nil {
			f.Close()
			return nil, err
		}
		r := bufio.NewReaderSize(f, 1<<16)
		offset := from
		for size < budget {
			line, _ := r.ReadBytes('\n')
			if len(line) == 0 || line[len(line)-1] != '\n' {
				break // the end, or an event still being written
			}
			offset += int64(len(line))
			size += int64(len(line))
			c.events = append(c.events, bytes.TrimSuffix(line, []byte("\n")))
			c.counts[seq]++
			c.next = cursor{Segment: seq, Offset: offset}
		}
		f.Close()
		if size >= budget {
			break
		}
		if seq != writing {
			// Read to its end: once sent, the next segment starts at its beginning.
			c.done = append(c.done, seq)
			c.next = cursor{Segment: seq + 1}
			continue
		}
		break
	}
	return c, nil
}

func gzipArray(events [][]byte) ([]byte, error) {
	var buf bytes.Buffer
	w := gzip.NewWriter(&buf)
	_, _ = w.Write([]byte("["))
	for i, e := range events {
		if i > 0 {
			_, _ = w.Write([]byte(","))
		}
		_, _ = w.Write(e)
	}
	_, _ = w.Write([]byte("]"))
	if err := w.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// sendOne uploads the oldest chunk; false when there was nothing to send.
func (u *uploader) sendOne(ctx context.Context) (bool, error) {
	c, err := u.readChunk()
	if err != nil {
		return false, err
	}
	if len(c.events) == 0 {
		u.advance(c, 0, false)
		return false, nil
	}
	events := c.events
	body, err := gzipArray(events)
	if err != nil {
		return false, err
	}
	// Too large once compressed: send fewer (the cursor then stops after them).
	for int64(len(body)) > u.uploadLimit && len(events) > 1 {
		events = events[:len(events)/2]
		if body, err = gzipArray(events); err != nil {
			return false, err
		}
	}
	if len(events) < len(c.events) {
		c = u.prefix(c, len(events))
	}
	if int64(len(body)) > u.uploadLimit {
		// One event larger than an upload may be: OPA drops it too, counted.
		u.advance(c, 1, true)
		return true, nil
	}
	resp, err := u.client.WithHeader("Content-Type", "application/json").
		WithHeader("Content-Encoding", "gzip").WithBytes(body).Do(ctx, "POST", u.resource)
	if err != nil {
		return false, err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return false, fmt.Errorf("the collector answered HTTP %d", resp.StatusCode)
	}
	u.advance(c, int64(len(events)), false)
	return true, nil
}

// prefix is the chunk cut after its first n events: the cursor stops after them.
func (u *uploader) prefix(c *chunk, n int) *chunk {
	at := c.start
	out := &chunk{events: c.events[:n], start: at, next: at, counts: map[uint64]int64{}}
	seq, offset := at.Segment, at.Offset
	for i := 0; i < n; i++ {
		// Events are read in order: walk them, starting a new segment where one ends.
		for {
			size := u.segmentSize(seq)
			if offset < size {
				break
			}
			out.done = append(out.done, seq)
			seq, offset = seq+1, 0
		}
		offset += int64(len(c.events[i])) + 1
		out.counts[seq]++
	}
	out.next = cursor{Segment: seq, Offset: offset}
	return out
}

func (u *uploader) segmentSize(seq uint64) int64 {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.segments[seq]
}

// advance moves the cursor past a sent (or skipped) chunk of n events and removes the
// segments it finished. The cap may have dropped some of the chunk's segments while it
// was being sent: their events were counted dropped then (and are no longer queued).
func (u *uploader) advance(c *chunk, n int64, skipped bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	var gone int64 // events of the chunk in segments the cap dropped meanwhile
	for seq, count := range c.counts {
		if _, ok := u.segments[seq]; ok {
			u.lines[seq] -= count
		} else {
			gone += count
		}
	}
	u.queued -= n - gone
	if skipped {
		u.dropped += n - gone
	} else if n > 0 {
		// The collector has them all: those the cap dropped arrived after all.
		u.sent += n
		u.dropped -= gone
		u.failing, u.lastErr, u.lastOK = false, "", time.Now()
	}
	if c.next.Segment < u.at.Segment { // the cap dropped up to the chunk's end meanwhile
		return
	}
	for _, seq := range c.done {
		if seq == u.writing {
			continue
		}
		delete(u.segments, seq)
		delete(u.lines, seq)
		_ = os.Remove(u.segmentPath(seq))
	}
	if c.next != u.at {
		u.at = c.next
		u.saveCursor()
	}
}

// flush sends everything queued; the first error stops it.
func (u *uploader) flush(ctx context.Context) error {
	for ctx.Err() == nil {
		more, err := u.sendOne(ctx)
		if err != nil {
			u.mu.Lock()
			u.failures++
			u.failing, u.lastErr = true, err.Error()
			u.mu.Unlock()
			return err
		}
		if !more {
			return nil
		}
	}
	return ctx.Err()
}

func (u *uploader) loop() {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	retry := 0
	for {
		var delay time.Duration
		switch {
		case retry > 0:
			delay = util.DefaultBackoff(float64(minRetryDelay), float64(u.maxDelay), retry)
		case u.trigger == plugins.TriggerImmediate:
			delay = u.maxDelay
		default:
			delay = u.minDelay + time.Duration(rand.Int63n(int64(u.maxDelay-u.minDelay)+1))
		}
		timer := time.NewTimer(delay)
		select {
		case <-timer.C:
		case <-u.wake:
			timer.Stop()
			if retry > 0 {
				continue // a new event does not cut a backoff short
			}
		case stopCtx := <-u.stopReq:
			timer.Stop()
			if _, ok := stopCtx.Deadline(); ok {
				_ = u.flush(stopCtx)
			}
			close(u.stopped)
			return
		}
		if err := u.flush(ctx); err != nil {
			retry++
		} else {
			retry = 0
		}
	}
}

func (u *uploader) stats() map[string]any {
	u.mu.Lock()
	defer u.mu.Unlock()
	var spool int64
	for _, size := range u.segments {
		spool += size
	}
	out := map[string]any{
		"queued":          u.queued,
		"sent":            u.sent,
		"dropped":         u.dropped,
		"upload_failures": u.failures,
		"failing":         u.failing,
		"last_error":      u.lastErr,
		"spool_bytes":     spool - u.at.Offset,
		"spool_cap_bytes": u.spoolCap,
	}
	if !u.lastOK.IsZero() {
		out["last_upload"] = u.lastOK.UTC().Format(time.RFC3339Nano)
	}
	return out
}

// One decision as the engine logs it.
type loggedDecision struct {
	DecisionID string            `json:"decision_id"`
	Path       string            `json:"path"`
	Input      json.RawMessage   `json:"input"`
	Result     json.RawMessage   `json:"result"`
	Timestamp  time.Time         `json:"timestamp"`
	Bundles    map[string]string `json:"bundles"`
	Metrics    map[string]any    `json:"metrics"`
}

// masks says whether the policy has rules at the decision_logs plugin's mask or drop
// path (default data.system.log.mask / .drop): only then must an event go through the
// plugin, which converts it to Rego values to evaluate them. Without them the plugin
// would hand on the event as it is, so it is built here and spooled as it is — its input
// and result the engine's JSON text, never parsed.
func masks(compiler *ast.Compiler, u *uploader) bool {
	for _, path := range []string{u.maskPath, u.dropPath} {
		ref, err := ast.PtrRef(ast.DefaultRootDocument, path)
		if err != nil || len(compiler.GetRulesWithPrefix(ref)) > 0 {
			return true
		}
	}
	return false
}

// mcp_fleet_log hands a JSON array of decisions to the decision_logs plugin (or, when the
// policy neither masks nor drops, straight to the spool, as the plugin would).
//
//export mcp_fleet_log
func mcp_fleet_log(eventsJSON *C.char, n C.size_t, out **C.char, outlen *C.size_t) (status C.int) {
	*out, *outlen = nil, 0
	defer func() {
		if r := recover(); r != nil {
			reply(out, outlen, fmt.Appendf(nil, "panic: %v", r))
			status = fleetError
		}
	}()
	f := running()
	if f == nil {
		return fleetStopped
	}
	if f.logs == nil {
		reply(out, outlen, []byte("no decision_logs configured"))
		return fleetError
	}
	var decisions []loggedDecision
	if err := json.Unmarshal(view(eventsJSON, n), &decisions); err != nil {
		reply(out, outlen, []byte(err.Error()))
		return fleetError
	}
	direct := !f.upload.masking.Load()
	labels := f.manager.Labels()
	var failed []string
	for i := range decisions {
		d := &decisions[i]
		ctx := context.WithValue(context.Background(), eventMetricsKey{}, d.Metrics)
		var err error
		if direct {
			bundles := make(map[string]logs.BundleInfoV1, len(d.Bundles))
			for name, revision := range d.Bundles {
				bundles[name] = logs.BundleInfoV1{Revision: revision}
			}
			var input, result any = d.Input, d.Result
			err = f.upload.Log(ctx, logs.EventV1{
				Labels: labels, DecisionID: d.DecisionID, Bundles: bundles, Path: d.Path,
				Input: &input, Result: &result, Timestamp: d.Timestamp,
			})
		} else {
			err = f.logThroughPlugin(ctx, d)
		}
		if err != nil {
			failed = append(failed, d.DecisionID+": "+err.Error())
		}
	}
	if len(failed) > 0 {
		fleetAnswer(out, outlen, failed)
		return fleetError
	}
	return fleetOK
}

// logThroughPlugin hands one decision to OPA's decision_logs plugin (masking, dropping).
func (f *fleet) logThroughPlugin(ctx context.Context, d *loggedDecision) error {
	var input, result any
	if err := util.UnmarshalJSON(d.Input, &input); err != nil {
		return err
	}
	if err := util.UnmarshalJSON(d.Result, &result); err != nil {
		return err
	}
	bundles := make(map[string]server.BundleInfo, len(d.Bundles))
	for name, revision := range d.Bundles {
		bundles[name] = server.BundleInfo{Revision: revision}
	}
	return f.logs.Log(ctx, &server.Info{
		DecisionID: d.DecisionID, Path: d.Path, Timestamp: d.Timestamp,
		Input: &input, Results: &result, Bundles: bundles,
	})
}

// mcp_fleet_check_events decodes a JSON array of decision-log events into OPA's own
// EventV1, refusing any field OPA does not know: what a collector built on OPA's types
// would read. *out is the first problem, or the count read.
//
//export mcp_fleet_check_events
func mcp_fleet_check_events(eventsJSON *C.char, n C.size_t, out **C.char, outlen *C.size_t) C.int {
	*out, *outlen = nil, 0
	var raw []json.RawMessage
	if err := json.Unmarshal(view(eventsJSON, n), &raw); err != nil {
		reply(out, outlen, []byte(err.Error()))
		return fleetError
	}
	for i, item := range raw {
		var event logs.EventV1
		decoder := json.NewDecoder(bytes.NewReader(item))
		decoder.DisallowUnknownFields()
		if err := decoder.Decode(&event); err != nil {
			reply(out, outlen, fmt.Appendf(nil, "event %d: %v", i, err))
			return fleetError
		}
		switch {
		case event.DecisionID == "":
			reply(out, outlen, fmt.Appendf(nil, "event %d: no decision_id", i))
			return fleetError
		case event.Timestamp.IsZero():
			reply(out, outlen, fmt.Appendf(nil, "event %d: no timestamp", i))
			return fleetError
		case event.Labels["id"] == "" || event.Labels["version"] == "":
			reply(out, outlen, fmt.Appendf(nil, "event %d: labels without id and version", i))
			return fleetError
		}
	}
	reply(out, outlen, fmt.Appendf(nil, "%d", len(raw)))
	return fleetOK
}
