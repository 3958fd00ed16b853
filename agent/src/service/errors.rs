//! Domain errors to gRPC statuses: the code says what kind of wrong, a BadRequest field
//! violation names the field, with its full path in the request.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use tracing::error;

use crate::{
    core::{
        trace::TraceError,
        validate::{ErrorCode, ValidationError},
    },
    node::NodeError,
};

/// Which repeated field of the request a [`ValidationError::index`] points into.
#[derive(Clone, Copy)]
pub enum RequestList {
    /// `ApplyRequest.changes`
    Changes,
    /// `SyncRequest.resources`
    Resources,
}

impl RequestList {
    fn name(self) -> &'static str {
        match self {
            RequestList::Changes => "changes",
            RequestList::Resources => "resources",
        }
    }
}

pub fn validation_status(error: &ValidationError, list: RequestList) -> Status {
    let field = match (error.index, error.field.is_empty()) {
        (Some(index), true) => format!("{}[{index}]", list.name()),
        (Some(index), false) => format!("{}[{index}].{}", list.name(), error.field),
        (None, _) => error.field.clone(),
    };
    field_violation(error.code, field, &error.message)
}

/// The status of a request with no list of resources (a filter, a query) whose field
/// `error` names is wrong.
pub fn request_status(error: &ValidationError) -> Status {
    field_violation(error.code, error.field.clone(), &error.message)
}

fn field_violation(code: ErrorCode, field: String, message: &str) -> Status {
    let code = match code {
        ErrorCode::InvalidArgument => Code::InvalidArgument,
        ErrorCode::NotFound => Code::NotFound,
        ErrorCode::AlreadyExists => Code::AlreadyExists,
        ErrorCode::FailedPrecondition => Code::FailedPrecondition,
    };
    Status::with_error_details(
        code,
        format!("{field}: {message}"),
        ErrorDetails::with_bad_request_violation(field, message),
    )
}

/// The status of a failed Apply or Sync.
pub fn node_status(error: NodeError, list: RequestList) -> Status {
    match error {
        NodeError::Invalid(invalid) => validation_status(&invalid, list),
        other => query_status(other),
    }
}

/// The status of a failed query or port operation (counters, connections).
pub fn query_status(error: NodeError) -> Status {
    match error {
        NodeError::PortNotProgrammed { ref port_id } => Status::with_error_details(
            Code::NotFound,
            format!("port_id: {error}"),
            ErrorDetails::with_bad_request_violation(
                "port_id",
                format!("port {port_id} is not programmed on this node"),
            ),
        ),
        NodeError::Datapath(ref datapath) => {
            // The request was valid; the kernel refused (a full map, a vanished device).
            error!(error = ?datapath, "datapath operation failed");
            Status::internal(format!("{error}: {}", chain(datapath)))
        }
        NodeError::Invalid(ref invalid) => Status::invalid_argument(invalid.to_string()),
        NodeError::Monitor(ref monitor) => {
            error!(error = ?monitor, "packet monitor failed");
            Status::internal(format!("{error}: {}", chain(monitor)))
        }
        NodeError::Store(ref store) => {
            // Valid, and the datapath took it, but it could not be made durable: undone.
            error!(error = ?store, "storing the desired state failed");
            Status::unavailable(format!("{error}: {}", chain(store)))
        }
    }
}

/// An error and its sources, joined: the operator sees the kernel's reason.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// For requests that name one resource by id.
pub fn not_found(kind: &str, id: &str) -> Status {
    Status::with_error_details(
        Code::NotFound,
        format!("id: no {kind} {id}"),
        ErrorDetails::with_bad_request_violation("id", format!("no {kind} {id}")),
    )
}

/// For a request field that must be set.
pub fn missing_field(field: &str) -> Status {
    Status::with_error_details(
        Code::InvalidArgument,
        format!("{field}: required"),
        ErrorDetails::with_bad_request_violation(field, "required"),
    )
}

/// A field of a request that is no list (a query), refused.
pub fn field_status(error: &ValidationError) -> Status {
    validation_status(error, RequestList::Changes)
}

/// A packet the trace cannot follow: an unknown port is NOT_FOUND, the rest a field to
/// give or change.
pub fn trace_status(error: &TraceError) -> Status {
    let (code, field, message) = match error {
        TraceError::UnknownPort(port_id) => (
            Code::NotFound,
            "port_id",
            format!("port {port_id} is not programmed on this node"),
        ),
        TraceError::NoDefault { field, why } | TraceError::Unsupported { field, why } => {
            (Code::InvalidArgument, *field, why.clone())
        }
    };
    let field = match field {
        "src" => "src_ip",
        other => other,
    };
    Status::with_error_details(
        code,
        format!("{field}: {message}"),
        ErrorDetails::with_bad_request_violation(field, message),
    )
}
