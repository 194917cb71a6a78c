// A CI pipeline against Berth's public gRPC API (berth.v1), in Go, with
// stubs generated from protos/berth/v1 by protoc-gen-go and
// protoc-gen-go-grpc:
//
//	create a project (admin key), register deployments by image reference,
//	promote them to production, roll back, read the history, the
//	deployment's status and errors, and make mistakes on purpose: each
//	refusal's code and google.rpc.Status details (ErrorInfo reason,
//	BadRequest field, ResourceInfo) are checked.
//
// It prints one JSON summary line on stdout and exits 1 when a check failed.
// Environment: BERTH_REGISTRY_ADDR, BERTH_SCHEDULER_ADDR, BERTH_ADMIN_KEY,
// BERTH_IMAGE (an image reference the scheduler can run or pull),
// BERTH_PROJECT_NAME.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"time"

	berthv1 "github.com/berth-dev/berth/gen/go/berth/v1"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// Deadline of every call, as Berth's own services use.
const deadline = 5 * time.Second

type check struct {
	Name   string `json:"name"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail,omitempty"`
}

// refusal is what a client can read of a gRPC error: the code, the message
// and the google.rpc.Status details.
type refusal struct {
	Code         string            `json:"code"`
	Message      string            `json:"message"`
	Reason       string            `json:"reason"`
	Domain       string            `json:"domain"`
	Metadata     map[string]string `json:"metadata"`
	Fields       []string          `json:"fields"`
	ResourceType string            `json:"resource_type"`
	ResourceName string            `json:"resource_name"`
	Details      []string          `json:"details"`
}

type entry struct {
	Sequence     int64  `json:"sequence"`
	Kind         string `json:"kind"`
	DeploymentID string `json:"deployment_id"`
}

type summary struct {
	OK          bool                `json:"ok"`
	Checks      []check             `json:"checks"`
	Failures    []string            `json:"failures"`
	Project     map[string]string   `json:"project"`
	Deployments map[string]string   `json:"deployments"`
	Bounds      map[string][2]int32 `json:"bounds"`
	History     []entry             `json:"history"`
	Status      map[string]string   `json:"status"`
	Errors      []string            `json:"errors"`
	BadInput    map[string]refusal  `json:"bad_input"`
}

var out = summary{
	Checks: []check{}, Failures: []string{}, Project: map[string]string{}, Deployments: map[string]string{},
	Bounds: map[string][2]int32{}, History: []entry{}, Status: map[string]string{}, Errors: []string{},
	BadInput: map[string]refusal{},
}

func step(name string, run func() error) {
	err := run()
	c := check{Name: name, OK: err == nil}
	if err != nil {
		c.Detail = err.Error()
		out.Failures = append(out.Failures, name+": "+err.Error())
	}
	out.Checks = append(out.Checks, c)
}

func env(name string) string {
	value := os.Getenv(name)
	if value == "" {
		fmt.Fprintf(os.Stderr, "%s is not set\n", name)
		os.Exit(2)
	}
	return value
}

// call returns a context carrying the key in x-api-key and a deadline.
func call(key string) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	return metadata.AppendToOutgoingContext(ctx, "x-api-key", key), cancel
}

// word is the contract's word for an enum value: its name without the
// enum's prefix, lowercased (KIND_PROMOTE -> "promote"). A value these stubs
// do not know (a newer server) reads "unknown".
func word(value protoreflect.Enum) string {
	d := value.Descriptor().Values().ByNumber(value.Number())
	if d == nil {
		return "unknown"
	}
	zero := string(value.Descriptor().Values().ByNumber(0).Name()) // e.g. KIND_UNSPECIFIED
	prefix := strings.TrimSuffix(zero, "UNSPECIFIED")
	return strings.ToLower(strings.TrimPrefix(string(d.Name()), prefix))
}

// refused reads a refusal's code and details; an error when err is nil.
func refused(err error) (refusal, error) {
	if err == nil {
		return refusal{}, fmt.Errorf("the call succeeded; a refusal was expected")
	}
	st, ok := status.FromError(err)
	if !ok {
		return refusal{}, fmt.Errorf("not a gRPC status: %v", err)
	}
	r := refusal{Code: st.Code().String(), Message: st.Message(), Metadata: map[string]string{}, Fields: []string{},
		Details: []string{}}
	for _, any := range st.Proto().GetDetails() {
		r.Details = append(r.Details, any.GetTypeUrl())
	}
	for _, detail := range st.Details() {
		switch d := detail.(type) {
		case *errdetails.ErrorInfo:
			r.Reason, r.Domain = d.GetReason(), d.GetDomain()
			for k, v := range d.GetMetadata() {
				r.Metadata[k] = v
			}
		case *errdetails.BadRequest:
			for _, v := range d.GetFieldViolations() {
				r.Fields = append(r.Fields, v.GetField())
			}
		case *errdetails.ResourceInfo:
			r.ResourceType, r.ResourceName = d.GetResourceType(), d.GetResourceName()
		case error:
			return r, fmt.Errorf("a detail did not decode: %v", d)
		}
	}
	return r, nil
}

// expectRefusal records a refusal under name and checks its code, reason
// and (when given) the BadRequest field.
func expectRefusal(name string, err error, code codes.Code, reason, field string) error {
	r, problem := refused(err)
	if problem != nil {
		return problem
	}
	out.BadInput[name] = r
	if r.Code != code.String() {
		return fmt.Errorf("code %s, want %s (%s)", r.Code, code, r.Message)
	}
	if r.Domain != "berth.dev" || r.Reason == "" {
		return fmt.Errorf("no ErrorInfo of berth.dev in the details: %+v", r)
	}
	if reason != "" && r.Reason != reason {
		return fmt.Errorf("reason %s, want %s", r.Reason, reason)
	}
	if field != "" && (len(r.Fields) != 1 || r.Fields[0] != field) {
		return fmt.Errorf("BadRequest fields %v, want [%s]", r.Fields, field)
	}
	return nil
}

func main() {
	dial := func(addr string) *grpc.ClientConn {
		conn, err := grpc.Dial(addr, grpc.WithInsecure())
		if err != nil {
			fmt.Fprintf(os.Stderr, "dial %s: %v\n", addr, err)
			os.Exit(2)
		}
		return conn
	}
	registryConn, schedulerConn := dial(env("BERTH_REGISTRY_ADDR")), dial(env("BERTH_SCHEDULER_ADDR"))
	defer registryConn.Close()
	defer schedulerConn.Close()
	registry := berthv1.NewRegistryClient(registryConn)
	scheduler := berthv1.NewSchedulerClient(schedulerConn)
	admin, image, projectName := env("BERTH_ADMIN_KEY"), env("BERTH_IMAGE"), env("BERTH_PROJECT_NAME")

	var key string
	step("create_project", func() error {
		ctx, cancel := call(admin)
		defer cancel()
		created, err := registry.CreateProject(ctx, &berthv1.CreateProjectRequest{Name: projectName})
		if err != nil {
			return err
		}
		key = created.GetApiKey()
		out.Project["id"], out.Project["name"] = created.GetProject().GetId(), created.GetProject().GetName()
		if !strings.HasPrefix(key, "berth_pk_") {
			return fmt.Errorf("api key %.12q... is not a project key", key)
		}
		return nil
	})
	if key == "" {
		finish()
		return
	}

	deploy := func(name string, bounds *[2]int32) error {
		ctx, cancel := call(key)
		defer cancel()
		request := &berthv1.DeployRequest{Image: image, Reason: "go client " + name}
		if bounds != nil { // optional fields: set only when given
			request.MinReplicas, request.MaxReplicas = proto.Int32(bounds[0]), proto.Int32(bounds[1])
		}
		resp, err := registry.Deploy(ctx, request)
		if err != nil {
			return err
		}
		out.Deployments[name] = resp.GetDeployment().GetId()
		out.Bounds[name] = [2]int32{resp.GetEntry().GetMinReplicas(), resp.GetEntry().GetMaxReplicas()}
		if got := word(resp.GetEntry().GetKind()); got != "deploy" {
			return fmt.Errorf("entry kind %q, want deploy", got)
		}
		if got := word(resp.GetDeployment().GetState()); got != "active" {
			return fmt.Errorf("deployment state %q, want active", got)
		}
		return nil
	}
	step("deploy_v1_by_image", func() error { return deploy("v1", nil) })
	// Explicit bounds 0..1 are honoured (unset would be 1..3).
	step("deploy_v2_bounds_0_1", func() error { return deploy("v2", &[2]int32{0, 1}) })
	v1, v2 := out.Deployments["v1"], out.Deployments["v2"]

	move := func(name string, run func(ctx context.Context) (*berthv1.PointerMoveResponse, error), kind, to string) {
		step(name, func() error {
			ctx, cancel := call(key)
			defer cancel()
			resp, err := run(ctx)
			if err != nil {
				return err
			}
			if got := word(resp.GetEntry().GetKind()); got != kind {
				return fmt.Errorf("entry kind %q, want %s", got, kind)
			}
			if resp.GetEnvironment().GetDeploymentId() != to {
				return fmt.Errorf("production points at %s, want %s", resp.GetEnvironment().GetDeploymentId(), to)
			}
			return nil
		})
	}
	move("promote_v1_production", func(ctx context.Context) (*berthv1.PointerMoveResponse, error) {
		return registry.Promote(ctx, &berthv1.PromoteRequest{DeploymentId: v1, TargetEnvironment: "production",
			Confirm: true, MinReplicas: proto.Int32(1), MaxReplicas: proto.Int32(1)})
	}, "promote", v1)
	move("promote_v2_production", func(ctx context.Context) (*berthv1.PointerMoveResponse, error) {
		return registry.Promote(ctx, &berthv1.PromoteRequest{DeploymentId: v2, TargetEnvironment: "production",
			Confirm: true, ExpectedSequence: proto.Int64(1)})
	}, "promote", v2)
	move("rollback_production", func(ctx context.Context) (*berthv1.PointerMoveResponse, error) {
		return registry.Rollback(ctx, &berthv1.RollbackRequest{Environment: "production", Confirm: true,
			Reason: "go client rollback"})
	}, "rollback", v1)

	step("history_production", func() error {
		token := ""
		for page := 0; page < 100; page++ { // bounded: follows next_page_token
			ctx, cancel := call(key)
			resp, err := registry.ListHistory(ctx, &berthv1.ListHistoryRequest{Environment: "production", PageSize: 2,
				PageToken: token})
			cancel()
			if err != nil {
				return err
			}
			for _, e := range resp.GetEntries() {
				out.History = append(out.History, entry{e.GetSequence(), word(e.GetKind()), e.GetDeploymentId()})
			}
			if token = resp.GetNextPageToken(); token == "" {
				return nil
			}
		}
		return fmt.Errorf("more than 100 pages of history")
	})

	step("status_v1", func() error {
		var last error
		for attempt := 0; attempt < 50; attempt++ { // the scheduler may not have seen the bindings yet
			ctx, cancel := call(key)
			resp, err := scheduler.GetDeploymentStatus(ctx, &berthv1.GetDeploymentStatusRequest{DeploymentId: v1,
				Environment: "production"})
			cancel()
			if err == nil {
				out.Status["deployment_id"] = resp.GetDeployment().GetId()
				for _, b := range resp.GetBindings() {
					out.Status[b.GetEnvironment()] = word(b.GetStatus())
				}
				return nil
			}
			last = err
			if code := status.Code(err); code != codes.NotFound && code != codes.Unavailable {
				return err
			}
			time.Sleep(200 * time.Millisecond)
		}
		return last
	})

	step("errors_latest", func() error {
		ctx, cancel := call(key)
		defer cancel()
		resp, err := scheduler.ListDeploymentErrors(ctx, &berthv1.ListDeploymentErrorsRequest{Latest: true})
		if err != nil {
			return err
		}
		for _, e := range resp.GetErrors() {
			out.Errors = append(out.Errors, word(e.GetKind())+": "+e.GetMessage())
		}
		return nil
	})

	// Mistakes on purpose: each refusal carries its details.
	step("deploy_empty_image", func() error {
		ctx, cancel := call(key)
		defer cancel()
		_, err := registry.Deploy(ctx, &berthv1.DeployRequest{Image: ""})
		return expectRefusal("deploy_empty_image", err, codes.InvalidArgument, "", "image")
	})
	step("deploy_min_above_max", func() error {
		ctx, cancel := call(key)
		defer cancel()
		_, err := registry.Deploy(ctx, &berthv1.DeployRequest{Image: image, MinReplicas: proto.Int32(3),
			MaxReplicas: proto.Int32(2)})
		return expectRefusal("deploy_min_above_max", err, codes.InvalidArgument, "", "min_replicas")
	})
	step("promote_production_unconfirmed", func() error {
		ctx, cancel := call(key)
		defer cancel()
		_, err := registry.Promote(ctx, &berthv1.PromoteRequest{DeploymentId: v2, TargetEnvironment: "production"})
		return expectRefusal("promote_production_unconfirmed", err, codes.FailedPrecondition, "PROTECTED_ENVIRONMENT", "")
	})
	step("promote_stale_sequence", func() error {
		ctx, cancel := call(key)
		defer cancel()
		_, err := registry.Promote(ctx, &berthv1.PromoteRequest{DeploymentId: v2, TargetEnvironment: "production",
			Confirm: true, ExpectedSequence: proto.Int64(1)})
		if problem := expectRefusal("promote_stale_sequence", err, codes.Aborted, "SEQUENCE_CONFLICT", ""); problem != nil {
			return problem
		}
		if got := out.BadInput["promote_stale_sequence"].Metadata["current_sequence"]; got != "3" {
			return fmt.Errorf("current_sequence %q, want 3", got)
		}
		return nil
	})
	step("unknown_deployment", func() error {
		ctx, cancel := call(key)
		defer cancel()
		_, err := registry.GetDeployment(ctx, &berthv1.GetDeploymentRequest{DeploymentId: "dep_000000000000"})
		if problem := expectRefusal("unknown_deployment", err, codes.NotFound, "", ""); problem != nil {
			return problem
		}
		if r := out.BadInput["unknown_deployment"]; r.ResourceType != "deployment" {
			return fmt.Errorf("ResourceInfo %q/%q, want deployment", r.ResourceType, r.ResourceName)
		}
		return nil
	})
	step("status_without_deployment_id", func() error {
		ctx, cancel := call(key)
		defer cancel()
		_, err := scheduler.GetDeploymentStatus(ctx, &berthv1.GetDeploymentStatusRequest{})
		return expectRefusal("status_without_deployment_id", err, codes.InvalidArgument, "", "deployment_id")
	})
	step("wrong_key", func() error {
		ctx, cancel := call("berth_pk_" + strings.Repeat("x", 43))
		defer cancel()
		_, err := registry.ListEnvironments(ctx, &berthv1.ListEnvironmentsRequest{})
		return expectRefusal("wrong_key", err, codes.Unauthenticated, "", "")
	})
	finish()
}

func finish() {
	out.OK = len(out.Failures) == 0
	line, err := json.Marshal(out)
	if err != nil {
		fmt.Fprintf(os.Stderr, "summary: %v\n", err)
		os.Exit(2)
	}
	fmt.Println(string(line))
	if !out.OK {
		os.Exit(1)
	}
}
