// Package main is OPA's own Rego evaluator as a C shared library, for the engine's
// in-process policy evaluator (engine/policy/inprocess.py loads it with ctypes).
//
//	go build -buildmode=c-shared -trimpath -o libmcppolicy_opa.so .
//
// A policy is prepared once (modules parsed as Rego v1 and compiled by one compiler,
// its data in one in-memory store, each query prepared against both) and named by a
// handle. Evaluations on a handle may run on many threads at once: a prepared query is
// safe for concurrent use and the store is only ever read. Everything handed back goes
// through *out / *outlen as bytes the caller frees with mcp_opa_free.
package main

/*
#include <stdint.h>
#include <stdlib.h>
*/
import "C"

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/rego"
	"github.com/open-policy-agent/opa/v1/storage"
	"github.com/open-policy-agent/opa/v1/storage/inmem"
	"github.com/open-policy-agent/opa/v1/topdown"
	"github.com/open-policy-agent/opa/v1/util"
	"github.com/open-policy-agent/opa/v1/version"
)

// Status codes of mcp_opa_eval; engine/policy/inprocess.py has the same table.
const (
	statusOK        = 0 // *out is the JSON of the first expression's value
	statusUndefined = 1 // the query has no result
	statusEvalError = 2 // *out is OPA's message (a conflict, a builtin error)
	statusCancelled = 3 // the deadline passed first
	statusUnknown   = 4 // no such handle or query index
	statusPanic     = 5 // *out is the panic's message
	statusBadInput  = 6 // the input is not one valid JSON value
)

// The most compile errors reported at once (the OPA server's default).
const maxErrorMessages = 10

// The bundle mcp_opa_prepare takes.
type policyBundle struct {
	Modules map[string]string `json:"modules"`
	Data    map[string]any    `json:"data"`
	Queries []string          `json:"queries"`
}

// One parse or compile error, located the way OPA reports them.
type problem struct {
	File    string `json:"file"`
	Row     int    `json:"row"`
	Col     int    `json:"col"`
	Message string `json:"message"`
}

type policy struct {
	queries  []rego.PreparedEvalQuery
	compiler *ast.Compiler // for the decision_logs plugin's mask and drop (fleet.go)
	store    storage.Store
}

// The prepared policies by handle. An evaluation holds its *policy, so releasing the
// handle while it runs only stops new evaluations from finding it.
var (
	mu         sync.RWMutex
	policies   = map[uintptr]*policy{}
	lastHandle uintptr
)

// view is the C buffer as a Go slice, without a copy: it is only valid during the call,
// and the JSON decoder copies whatever it keeps. NULL is nil (no document at all); an
// empty buffer is an empty slice (not valid JSON).
func view(p *C.char, n C.size_t) []byte {
	if p == nil {
		return nil
	}
	if n == 0 {
		return []byte{}
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(p)), int(n))
}

// reply hands b to the caller in C memory (malloc'd; freed with mcp_opa_free).
func reply(out **C.char, outlen *C.size_t, b []byte) {
	*out = (*C.char)(C.CBytes(b))
	*outlen = C.size_t(len(b))
}

// problems turns a parse or compile error into located problems.
func problems(err error) []problem {
	var astErrs ast.Errors
	if !errors.As(err, &astErrs) {
		return []problem{{Message: err.Error()}}
	}
	out := make([]problem, 0, len(astErrs))
	for _, e := range astErrs {
		p := problem{Message: e.Message}
		if e.Location != nil {
			p.File, p.Row, p.Col = e.Location.File, e.Location.Row, e.Location.Col
		}
		out = append(out, p)
	}
	return out
}

// prepare parses and compiles the bundle once and prepares each of its queries.
func prepare(raw []byte) (*policy, []problem) {
	var b policyBundle
	if err := util.UnmarshalJSON(raw, &b); err != nil {
		return nil, []problem{{Message: "bundle is not valid JSON: " + err.Error()}}
	}
	ids := make([]string, 0, len(b.Modules))
	for id := range b.Modules {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	// The parser options of `opa run`: Rego v1, METADATA annotations read.
	opts := ast.ParserOptions{RegoVersion: ast.RegoV1, ProcessAnnotation: true}
	modules := make(map[string]*ast.Module, len(ids))
	var found []problem
	for _, id := range ids {
		module, err := ast.ParseModuleWithOpts(id, b.Modules[id], opts)
		if err != nil {
			found = append(found, problems(err)...)
			continue
		}
		modules[id] = module
	}
	if len(found) > 0 {
		return nil, found
	}

	ctx := context.Background()
	if b.Data == nil {
		b.Data = map[string]any{}
	}
	// The data is read on every decision and never written: keep it as AST values, so
	// a read costs a lookup, not a conversion of the part read (a whole catalog).
	store := inmem.NewFromObjectWithOpts(b.Data, inmem.OptReturnASTValuesOnRead(true))
	txn, err := store.NewTransaction(ctx)
	if err != nil {
		return nil, problems(err)
	}
	// As the OPA server compiles: a rule may not sit where the data already has a value.
	compiler := ast.NewCompiler().
		SetErrorLimit(maxErrorMessages).
		WithPathConflictsCheck(storage.NonEmpty(ctx, store, txn))
	compiler.Compile(modules)
	store.Abort(ctx, txn)
	if compiler.Failed() {
		return nil, problems(compiler.Errors)
	}

	p := &policy{compiler: compiler, store: store}
	for _, q := range b.Queries {
		prepared, err := rego.New(rego.Query(q), rego.Compiler(compiler), rego.Store(store)).
			PrepareForEval(ctx)
		if err != nil {
			return nil, problems(err)
		}
		p.queries = append(p.queries, prepared)
	}
	return p, nil
}

// mcp_opa_prepare compiles the bundle {"modules": {id: rego}, "data": {...}, "queries":
// [...]} and returns its handle (> 0), or 0 with *out the JSON list of problems.
//
//export mcp_opa_prepare
func mcp_opa_prepare(bundleJSON *C.char, n C.size_t, out **C.char, outlen *C.size_t) (handle C.uintptr_t) {
	*out, *outlen = nil, 0
	defer func() {
		if r := recover(); r != nil {
			msg, _ := json.Marshal([]problem{{Message: fmt.Sprintf("panic: %v", r)}})
			reply(out, outlen, msg)
			handle = 0
		}
	}()
	p, found := prepare(view(bundleJSON, n))
	if found != nil {
		msg, _ := json.Marshal(found)
		reply(out, outlen, msg)
		return 0
	}
	mu.Lock()
	defer mu.Unlock()
	lastHandle++
	policies[lastHandle] = p
	return C.uintptr_t(lastHandle)
}

// deadline is the topdown.Cancel of one evaluation: the evaluator asks it before every
// expression (and in long builtins), and it answers from the clock, read every
// deadlineStride questions. Given to OPA as an external cancel, it saves the goroutine
// OPA would otherwise start per query to watch the context, and the wake-up of another
// thread that goroutine costs on every decision. The context keeps the same deadline
// for the builtins that wait on it (http.send).
type deadline struct {
	at        time.Time // zero: no deadline
	asked     atomic.Uint32
	cancelled atomic.Bool
}

const deadlineStride = 64

func (d *deadline) Cancel() { d.cancelled.Store(true) }

func (d *deadline) Cancelled() bool {
	if d.cancelled.Load() {
		return true
	}
	if d.at.IsZero() || d.asked.Add(1)%deadlineStride != 0 {
		return false
	}
	if time.Now().Before(d.at) {
		return false
	}
	d.cancelled.Store(true)
	return true
}

// evaluate runs one prepared query; input nil means no input document at all.
func evaluate(pq rego.PreparedEvalQuery, input []byte, timeout time.Duration) (int, []byte) {
	ctx := context.Background()
	limit := &deadline{}
	if timeout > 0 {
		limit.at = time.Now().Add(timeout)
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, limit.at)
		defer cancel()
	}
	options := []rego.EvalOption{rego.EvalExternalCancel(limit)}
	if input != nil {
		var doc any
		if err := util.UnmarshalJSON(input, &doc); err != nil {
			return statusBadInput, []byte(err.Error())
		}
		value, err := ast.InterfaceToValue(doc)
		if err != nil {
			return statusBadInput, []byte(err.Error())
		}
		options = append(options, rego.EvalParsedInput(value))
	}
	rs, err := pq.Eval(ctx, options...)
	switch {
	case err != nil && topdown.IsCancel(err):
		return statusCancelled, []byte(fmt.Sprintf("evaluation passed its deadline of %v", timeout))
	case err != nil:
		return statusEvalError, []byte(err.Error())
	case len(rs) == 0 || len(rs[0].Expressions) == 0:
		return statusUndefined, nil
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(rs[0].Expressions[0].Value); err != nil {
		return statusEvalError, []byte("result is not JSON: " + err.Error())
	}
	return statusOK, bytes.TrimSuffix(buf.Bytes(), []byte("\n"))
}

// mcp_opa_eval evaluates prepared query number `query` of `handle` with the JSON input
// (NULL: no input document) under a deadline of timeoutNs (<= 0: none), and returns a
// status code; *out is set (and must be freed) whenever it is not NULL.
//
//export mcp_opa_eval
func mcp_opa_eval(handle C.uintptr_t, query C.int, input *C.char, n C.size_t, timeoutNs C.int64_t, out **C.char, outlen *C.size_t) (status C.int) {
	*out, *outlen = nil, 0
	defer func() {
		if r := recover(); r != nil {
			reply(out, outlen, fmt.Appendf(nil, "panic: %v", r))
			status = statusPanic
		}
	}()
	mu.RLock()
	p := policies[uintptr(handle)]
	mu.RUnlock()
	if p == nil || query < 0 || int(query) >= len(p.queries) {
		return statusUnknown
	}
	code, body := evaluate(p.queries[query], view(input, n), time.Duration(timeoutNs))
	if body != nil {
		reply(out, outlen, body)
	}
	return C.int(code)
}

//export mcp_opa_release
func mcp_opa_release(handle C.uintptr_t) {
	mu.Lock()
	defer mu.Unlock()
	delete(policies, uintptr(handle))
}

//export mcp_opa_free
func mcp_opa_free(p *C.char) {
	C.free(unsafe.Pointer(p))
}

//export mcp_opa_version
func mcp_opa_version() *C.char {
	return C.CString(version.Version)
}

func main() {}
