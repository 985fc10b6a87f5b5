#[courier_rpc::service]
trait Echo {
    async fn echo<'a>(&self, text: std::borrow::Cow<'a, str>) -> String;
}

fn main() {}
