// A stand-in for vmafx-node's Go client, for tests/test_go_client.py: the request and ACK types a Go developer
// writes for the protocol in the README, run against a live sidecar. It judges nothing itself; it prints what it
// saw as one JSON report, and the Python test asserts on it.
//
//	go_node SOCKET
package main

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
)

const nFeatures = 80

// Sample is what a node sends after each job.
type Sample struct {
	JobID     string    `json:"job_id,omitempty"`
	Features  []float32 `json:"features"`
	TrueScore float64   `json:"true_score"`
}

// Request is one struct for samples and control messages, as a node may write it: an unset Op goes out as "".
type Request struct {
	Op        string    `json:"op"`
	JobID     string    `json:"job_id,omitempty"`
	Features  []float32 `json:"features,omitempty"`
	TrueScore float64   `json:"true_score"`
}

// PointerRequest leaves Op a pointer: unset, it goes out as null.
type PointerRequest struct {
	Op        *string   `json:"op"`
	Features  []float32 `json:"features"`
	TrueScore float64   `json:"true_score"`
}

// Ack holds every field the README documents for an ACK; decoded strictly, any other field is an error.
type Ack struct {
	Ok         bool     `json:"ok"`
	Op         string   `json:"op"`
	Step       int64    `json:"step"`
	Trained    bool     `json:"trained"`
	Loss       *float64 `json:"loss"`
	Checkpoint string   `json:"checkpoint"`
	Error      string   `json:"error"`
	JobID      string   `json:"job_id"`
	// The fields the line held: a field missing decodes to its zero value, which the struct cannot tell apart.
	present map[string]bool
}

// Status is the status answer as a node reads it: counts as int64, what may be null as pointers.
type Status struct {
	Ok                bool                       `json:"ok"`
	Op                string                     `json:"op"`
	Steps             int64                      `json:"steps"`
	SamplesAccepted   int64                      `json:"samples_accepted"`
	SamplesRejected   int64                      `json:"samples_rejected"`
	SamplesTrained    int64                      `json:"samples_trained"`
	SamplesHeldOut    int64                      `json:"samples_held_out"`
	Pending           int64                      `json:"pending"`
	ReplaySize        int64                      `json:"replay_size"`
	EvalSize          int64                      `json:"eval_size"`
	CheckpointVersion *int64                     `json:"checkpoint_version"`
	Gate              *Record                    `json:"gate"`
	LastLoss          *float64                   `json:"last_loss"`
	UptimeS           float64                    `json:"uptime_s"`
	Backend           string                     `json:"backend"`
	Model             string                     `json:"model"`
	Config            map[string]json.RawMessage `json:"config"`
}

// Record is latest.json, and the gate's record in the status answer.
type Record struct {
	Version int64  `json:"version"`
	File    string `json:"file"`
	Sha256  string `json:"sha256"`
	Step    int64  `json:"step"`
	Gate    string `json:"gate"`
	Reason  string `json:"reason"`
}

// Conn is a node's connection: a request line out, its ACK line back. A bufio.Reader, not a default
// bufio.Scanner, since an ACK that echoes a long job_id passes 64 KiB.
type Conn struct {
	conn   net.Conn
	reader *bufio.Reader
}

func dial(path string) *Conn {
	conn, err := net.Dial("unix", path)
	check(err)
	check(conn.SetDeadline(time.Now().Add(60 * time.Second)))
	return &Conn{conn, bufio.NewReader(conn)}
}

func (c *Conn) write(request interface{}) {
	line, err := json.Marshal(request)
	check(err)
	_, err = c.conn.Write(append(line, '\n'))
	check(err)
}

func (c *Conn) readLine() []byte {
	line, err := c.reader.ReadBytes('\n')
	check(err)
	return line
}

func (c *Conn) readAck() Ack {
	line := c.readLine()
	var ack Ack
	strict := json.NewDecoder(bytes.NewReader(line))
	strict.DisallowUnknownFields()
	check(strict.Decode(&ack))
	var fields map[string]json.RawMessage
	check(json.Unmarshal(line, &fields))
	ack.present = map[string]bool{}
	for name := range fields {
		ack.present[name] = true
	}
	return ack
}

func (c *Conn) ask(request interface{}) Ack {
	c.write(request)
	return c.readAck()
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "go_node:", err)
		os.Exit(1)
	}
}

// features is a learnable job: the score is a fixed function of the features.
func features(i int) ([]float32, float64) {
	x := make([]float32, nFeatures)
	score := 0.0
	for j := range x {
		x[j] = float32(math.Mod(float64(i*31+j*17), 97) / 97)
		score += float64(x[j]) * float64(j%5)
	}
	return x, score
}

// AckFacts is what a run of ACKs showed.
type AckFacts struct {
	Sent          int      `json:"sent"`
	Ok            int      `json:"ok"`
	Trained       int      `json:"trained"`
	FieldsPresent bool     `json:"fields_present"`
	LossIffTrain  bool     `json:"loss_iff_trained"`
	StepsInOrder  bool     `json:"steps_in_order"`
	JobIDsEchoed  bool     `json:"job_ids_echoed"`
	Checkpoints   []string `json:"checkpoints"`
	Errors        []string `json:"errors"`
}

func newFacts() *AckFacts {
	return &AckFacts{FieldsPresent: true, LossIffTrain: true, StepsInOrder: true, JobIDsEchoed: true}
}

func (f *AckFacts) take(jobID string, ack Ack, lastStep *int64) {
	f.Sent++
	if !ack.Ok {
		f.Errors = append(f.Errors, ack.Error)
		return
	}
	f.Ok++
	f.FieldsPresent = f.FieldsPresent && ack.present["ok"] && ack.present["step"] && ack.present["trained"] &&
		ack.present["job_id"]
	if ack.Trained {
		f.Trained++
	}
	f.LossIffTrain = f.LossIffTrain && ack.Trained == (ack.Loss != nil) && ack.Trained == ack.present["loss"]
	f.StepsInOrder = f.StepsInOrder && ack.Step >= *lastStep
	*lastStep = ack.Step
	f.JobIDsEchoed = f.JobIDsEchoed && ack.JobID == jobID
	if ack.Checkpoint != "" {
		f.Checkpoints = append(f.Checkpoints, ack.Checkpoint)
	}
}

// sequential sends n jobs one at a time, as a node does after each job.
func sequential(c *Conn, n int) *AckFacts {
	facts, step := newFacts(), int64(0)
	for i := 0; i < n; i++ {
		x, score := features(i)
		jobID := "enc-" + strconv.Itoa(i)
		facts.take(jobID, c.ask(Sample{jobID, x, score}), &step)
	}
	return facts
}

// ValueFact is the ACK to a sample holding one float32 Go writes in its own shortest form.
type ValueFact struct {
	Name    string `json:"name"`
	Written string `json:"written"`
	Ok      bool   `json:"ok"`
	Error   string `json:"error"`
}

func values(c *Conn) []ValueFact {
	cases := []struct {
		name  string
		value float32
	}{
		{"largest float32", math.MaxFloat32},
		{"lowest float32", -math.MaxFloat32},
		{"smallest subnormal", math.SmallestNonzeroFloat32},
		{"smallest normal", 1.1754944e-38},
		{"negative zero", float32(math.Copysign(0, -1))},
		{"0.1", 0.1},
		{"2^24 + 1, rounded", 16777217},
	}
	var facts []ValueFact
	for i, tc := range cases {
		x, score := features(i)
		x[7] = tc.value
		written, err := json.Marshal(tc.value)
		check(err)
		ack := c.ask(Sample{"value-" + strconv.Itoa(i), x, score})
		facts = append(facts, ValueFact{tc.name, string(written), ack.Ok, ack.Error})
	}
	return facts
}

// JobIDFact is whether a job_id came back as it was sent.
type JobIDFact struct {
	Length int    `json:"length"`
	Ok     bool   `json:"ok"`
	Echoed bool   `json:"echoed"`
	Error  string `json:"error"`
}

func jobIDs(c *Conn) []JobIDFact {
	ids := []string{"enc-8812", "ünïcödé 日本語", "tab\tnew line\ncontrol\x01", "<b>&amp;</b>", "\u2028\u2029",
		"emoji 😀", strings.Repeat("x", 65535), strings.Repeat("é", 32767)}
	var facts []JobIDFact
	for i, id := range ids {
		x, score := features(i)
		ack := c.ask(Sample{id, x, score})
		facts = append(facts, JobIDFact{len(id), ack.Ok, ack.JobID == id, ack.Error})
	}
	return facts
}

// Unified is what the one-struct requests got: a sample with Op "" and with Op null, then a ping.
type Unified struct {
	EmptyOp Ack `json:"empty_op"`
	NullOp  Ack `json:"null_op"`
	Ping    Ack `json:"ping"`
}

func unified(c *Conn) Unified {
	x, score := features(1)
	return Unified{c.ask(Request{Features: x, TrueScore: score}), c.ask(PointerRequest{nil, x, score}),
		c.ask(Request{Op: "ping"})}
}

// Pipelined is one connection that writes n jobs before reading an ACK, from its own goroutine.
type Pipelined struct {
	Sent    int  `json:"sent"`
	Ok      int  `json:"ok"`
	InOrder bool `json:"in_order"`
}

func pipelined(path string, n int) Pipelined {
	c := dial(path)
	defer c.conn.Close()
	go func() {
		for i := 0; i < n; i++ {
			x, score := features(i)
			c.write(Sample{"pipe-" + strconv.Itoa(i), x, score})
		}
	}()
	result := Pipelined{Sent: n, InOrder: true}
	for i := 0; i < n; i++ {
		ack := c.readAck()
		if ack.Ok {
			result.Ok++
		}
		result.InOrder = result.InOrder && ack.JobID == "pipe-"+strconv.Itoa(i)
	}
	return result
}

// concurrent runs goroutines, each a connection sending n jobs one at a time, and counts their ok ACKs.
func concurrent(path string, goroutines, n int) int {
	var wait sync.WaitGroup
	oks := make([]int, goroutines)
	for g := 0; g < goroutines; g++ {
		wait.Add(1)
		go func(g int) {
			defer wait.Done()
			c := dial(path)
			defer c.conn.Close()
			for i := 0; i < n; i++ {
				x, score := features(g*n + i)
				if c.ask(Sample{fmt.Sprintf("g%d-%d", g, i), x, score}).Ok {
					oks[g]++
				}
			}
		}(g)
	}
	wait.Wait()
	total := 0
	for _, ok := range oks {
		total += ok
	}
	return total
}

// StatusFacts is the status answer as decoded, with the config's integers read as int64.
type StatusFacts struct {
	Status         Status   `json:"status"`
	ConfigNotInt64 []string `json:"config_not_int64"`
}

func status(c *Conn) StatusFacts {
	c.write(map[string]string{"op": "status"})
	var facts StatusFacts
	check(json.Unmarshal(c.readLine(), &facts.Status))
	for name, raw := range facts.Status.Config {
		text := string(raw)
		if !strings.ContainsAny(text, `".eE`) && text != "null" {
			if _, err := strconv.ParseInt(text, 10, 64); err != nil {
				facts.ConfigNotInt64 = append(facts.ConfigNotInt64, name)
			}
		}
	}
	return facts
}

// Latest is latest.json as a node reads it, and whether the files it names are the ones it describes.
type Latest struct {
	Record        Record `json:"record"`
	FileMatches   bool   `json:"file_matches"`
	LatestMatches bool   `json:"latest_onnx_matches"`
}

func latest(directory string) Latest {
	text, err := os.ReadFile(filepath.Join(directory, "latest.json"))
	check(err)
	var result Latest
	check(json.Unmarshal(text, &result.Record))
	result.FileMatches = sha256Of(filepath.Join(directory, result.Record.File)) == result.Record.Sha256
	result.LatestMatches = sha256Of(filepath.Join(directory, "latest.onnx")) == result.Record.Sha256
	return result
}

func sha256Of(path string) string {
	content, err := os.ReadFile(path)
	check(err)
	sum := sha256.Sum256(content)
	return hex.EncodeToString(sum[:])
}

// Report is everything the test asserts on.
type Report struct {
	Sequential *AckFacts   `json:"sequential"`
	Values     []ValueFact `json:"values"`
	JobIDs     []JobIDFact `json:"job_ids"`
	Rejected   Ack         `json:"rejected"`
	Unified    Unified     `json:"unified"`
	Pipelined  Pipelined   `json:"pipelined"`
	Concurrent int         `json:"concurrent_ok"`
	Status     StatusFacts `json:"status"`
	Latest     *Latest     `json:"latest"`
}

func main() {
	if len(os.Args) != 2 {
		check(fmt.Errorf("usage: go_node SOCKET"))
	}
	path := os.Args[1]
	c := dial(path)
	defer c.conn.Close()
	var report Report
	report.Sequential = sequential(c, 300)
	report.Values = values(c)
	report.JobIDs = jobIDs(c)
	x, score := features(0)
	report.Rejected = c.ask(Sample{"short", x[:nFeatures-1], score})
	report.Unified = unified(c)
	report.Pipelined = pipelined(path, 1000)
	report.Concurrent = concurrent(path, 8, 50)
	report.Status = status(c)
	if n := len(report.Sequential.Checkpoints); n > 0 {
		found := latest(filepath.Dir(report.Sequential.Checkpoints[n-1]))
		report.Latest = &found
	}
	check(json.NewEncoder(os.Stdout).Encode(report))
}
