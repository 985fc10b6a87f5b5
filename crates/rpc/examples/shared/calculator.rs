//! The service both example processes are built from.

#[derive(serde::Serialize, serde::Deserialize, Debug)]
pub enum CalcError {
    DivideByZero,
}

#[courier_rpc::service]
pub trait Calculator {
    async fn add(&self, a: i64, b: i64) -> i64;
    async fn divide(&self, a: i64, b: i64) -> Result<i64, CalcError>;
}
